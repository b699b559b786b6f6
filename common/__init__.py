"""The lowest layer: what every other package may use and that imports nothing of the project.

Atomic files and image reading (``files``), bootstrap statistics (``stats``), the conditioning request
``Prompt`` and its image digest (``prompt``), the project's folders (``paths``) and GenEval's task list and
relation rule (``geneval_spec``). See docs/DESIGN.md for the layers above it.
"""
