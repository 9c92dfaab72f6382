"""Options of a command group accepted after its sub-command too (``entropy-proxy audit report --config FILE``).

argparse only knows a group's options before the sub-command's name; users type them after it, as with git and
kubectl. :func:`inherit_group_options` copies each group option into every sub-command below it, with the default
``SUPPRESS``, so a value given after the sub-command wins and an absent one leaves the group's value (or default)
in place. It walks the finished parser, so sub-commands added by any module inherit without knowing of it.
"""

from __future__ import annotations

import argparse
import copy


def inherit_group_options(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        group_options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        for child in set(action.choices.values()):
            for option in group_options:
                if any(s in child._option_string_actions for s in option.option_strings):
                    continue  # the sub-command has its own option of that name (e.g. a different --url)
                inherited = copy.copy(option)
                inherited.default = argparse.SUPPRESS
                inherited.required = False
                child._add_action(inherited)
            inherit_group_options(child)
