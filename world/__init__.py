"""The synthetic shapes world: the ground truth that training, judging and analysis all read.

- ``scene``: objects, canvas, the exact render, random layouts;
- ``prompts``: GenEval prompts, GenEval's rule applied to a scene, scenes that satisfy a prompt;
- ``descriptions``: long DPG-style descriptions;
- ``edits``: editing pairs and the parser of descriptions;
- ``detector``: the exact detector (palette, components, shape fit);
- ``dpg_questions``: DPG-Bench-style questions and their exact answers;
- ``vocab``: the closed vocabulary every caption uses.

Pure numpy / PIL: nothing here knows about models, training streams or ranks. docs/DESIGN.md gives the spec.
"""
