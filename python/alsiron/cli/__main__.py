"""``python -m alsiron.cli``: the ``alsiron`` command."""

from alsiron.cli import entry_point

entry_point()
