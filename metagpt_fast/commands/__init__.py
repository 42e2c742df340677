"""Sub-commands of the ``metagpt-fast`` CLI (see ``metagpt_fast.cli``)."""
