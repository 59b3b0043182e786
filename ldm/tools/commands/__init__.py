"""The command lines of ``scripts/*.py``: each module has the script's ``build_parser()`` and ``main(argv)``, so that
``ldm.tools.stages`` and the tests use the real parsers; the scripts themselves only call ``main``."""
