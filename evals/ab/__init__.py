"""Human A/B preference studies (paper Figs. 9 and 11): pair two systems' images, serve them blinded to
annotators, collect votes in a database, and report win / tie / loss rates with bootstrap CIs.

    python -m evals.ab create --db study.sqlite --study NAME --a DIR_A --b DIR_B --layout geneval --annotators 20
    python -m evals.ab serve --db study.sqlite --port 8000
    python -m evals.ab report --db study.sqlite --study NAME --out DIR

Modules, one concept each: ``db`` (tables and engine), ``layouts`` (benchmark folders -> items),
``study`` (pairing, blinding, gold pairs, annotator links), ``assign`` (who sees which pair; recording votes),
``web`` (the annotator and admin pages), ``crowd`` (crowd platforms such as Prolific: entry link, platform ids,
completion, payments CSV), ``safe_markdown`` (instructions and consent text), ``vendor`` (CSV export / import for
outsourced studies), ``report``
(win rates, CIs, agreement, Bradley-Terry, figure), ``shapes_world`` (all that is taken from the synthetic world:
gold renders and the demo's simulated annotators), ``demo`` (a study answered by simulated annotators).
"""
