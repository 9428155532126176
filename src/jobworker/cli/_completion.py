"""Shell completion scripts for jobctl (bash, zsh, fish): commands, every flag of each (read
from the parser itself, so none is missed), and job ids and names.

Job ids and names come from ``jobctl __jobs``, which goes through the connection keeper when
one runs and gives up after two seconds, so Tab never hangs on an unreachable server.
"""

from __future__ import annotations

import argparse

from ._parser import SHELLS, parser

__all__ = ["SHELLS", "script"]
# Commands whose positional arguments are jobs.
JOB_COMMANDS = ("status", "logs", "stop", "kill", "wait", "rm", "attach")


def _commands() -> tuple[dict[str, list[str]], list[str]]:
    """Each visible command's flags, and the top level's."""
    top = parser()
    flags: dict[str, list[str]] = {}
    for action in top._actions:  # noqa: SLF001 - argparse offers no public walk of its parsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001 - as above
            visible = {c.dest for c in action._choices_actions}  # noqa: SLF001 - as above
            for name, sub in action.choices.items():
                if name in visible:
                    flags[name] = sorted(o for a in sub._actions for o in a.option_strings)  # noqa: SLF001 - as above
    globals_ = sorted(o for a in top._actions for o in a.option_strings)  # noqa: SLF001 - as above
    return flags, globals_


def _bash(flags: dict[str, list[str]], top: list[str]) -> str:
    cases = "\n".join(f'        {c}) opts="{" ".join(f)}" ;;' for c, f in flags.items())
    jobs = "|".join(JOB_COMMANDS)
    return f"""# jobctl bash completion: eval "$(jobctl completion bash)"
_jobctl() {{
    local cur cmd opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    cmd=""
    for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$w" in -*) ;; *) cmd="$w"; break ;; esac
    done
    case "$cmd" in
{cases}
        *) opts="{" ".join(flags)} {" ".join(top)}" ;;
    esac
    case "$cmd" in
        {jobs}) [[ "$cur" != -* ]] && opts="$(jobctl __jobs 2>/dev/null)" ;;
    esac
    COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
}}
complete -F _jobctl jobctl
"""


def _zsh(flags: dict[str, list[str]], top: list[str]) -> str:
    cases = "\n".join(f"            {c}) compadd -- {' '.join(f)} ;;" for c, f in flags.items())
    jobs = "|".join(JOB_COMMANDS)
    return f"""#compdef jobctl
# jobctl zsh completion: eval "$(jobctl completion zsh)"
_jobctl() {{
    local -a commands
    commands=({" ".join(flags)})
    if (( CURRENT == 2 )); then
        _describe 'command' commands
        compadd -- {" ".join(top)}
    else
        case $words[2] in
            {jobs}) [[ $PREFIX != -* ]] && compadd -- ${{(f)"$(jobctl __jobs 2>/dev/null)"}} ;;
        esac
        case $words[2] in
{cases}
        esac
    fi
}}
compdef _jobctl jobctl
"""


def _fish(flags: dict[str, list[str]], top: list[str]) -> str:
    lines = ["# jobctl fish completion: jobctl completion fish | source\n"]
    lines += [f"complete -c jobctl -n __fish_use_subcommand -a {c}\n" for c in flags]
    lines += [f"complete -c jobctl -l {f.lstrip('-')}\n" for f in top if f.startswith("--")]
    for command, options in flags.items():
        for flag in options:
            kind = "-l" if flag.startswith("--") else "-s"
            lines.append(
                f"complete -c jobctl -n '__fish_seen_subcommand_from {command}' "
                f"{kind} {flag.lstrip('-')}\n"
            )
    lines += [
        f"complete -c jobctl -n '__fish_seen_subcommand_from {c}' -f -a '(jobctl __jobs 2>/dev/null)'\n"
        for c in JOB_COMMANDS
    ]
    return "".join(lines)


def script(shell: str) -> str:
    """The completion script for ``shell`` (one of SHELLS)."""
    flags, top = _commands()
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](flags, top)
