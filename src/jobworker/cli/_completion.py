"""Shell completion scripts for jobctl (bash, zsh, fish): commands and their flags."""

from __future__ import annotations

__all__ = ["SCRIPTS"]

COMMANDS = {
    "run": "--rm --cpus --memory --pids --tmp-size --image --seccomp --io-read-bps --io-write-bps "
    "--env --workdir --network",
    "start": "-f -q --json --cpus --memory --pids --tmp-size --image --seccomp --io-read-bps "
    "--io-write-bps --env --workdir --network",
    "status": "--json",
    "logs": "-f --follow --stdout --stderr --timestamps",
    "stop": "--grace",
    "kill": "-s --signal",
    "ls": "--all --owner --state --json",
    "wait": "",
    "rm": "",
    "completion": "bash zsh fish",
}
GLOBAL = "--server --ca --cert --key --context"

_BASH_CASES = "\n".join(f'        {c}) opts="{f}" ;;' for c, f in COMMANDS.items())
BASH = f"""# jobctl bash completion: eval "$(jobctl completion bash)"
_jobctl() {{
    local cur cmd opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    cmd=""
    for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$w" in -*) ;; *) cmd="$w"; break ;; esac
    done
    case "$cmd" in
{_BASH_CASES}
        *) opts="{" ".join(COMMANDS)} {GLOBAL}" ;;
    esac
    COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
}}
complete -F _jobctl jobctl
"""

ZSH = f"""#compdef jobctl
# jobctl zsh completion: eval "$(jobctl completion zsh)"
_jobctl() {{
    local -a commands
    commands=({" ".join(COMMANDS)})
    if (( CURRENT == 2 )); then
        _describe 'command' commands
    else
        case $words[2] in
{chr(10).join(f"            {c}) compadd -- {f} ;;" for c, f in COMMANDS.items())}
        esac
    fi
}}
compdef _jobctl jobctl
"""

FISH = (
    "# jobctl fish completion: jobctl completion fish | source\n"
    + "".join(f"complete -c jobctl -n __fish_use_subcommand -a {c}\n" for c in COMMANDS)
    + "".join(
        f"complete -c jobctl -n '__fish_seen_subcommand_from {c}' -l {flag.lstrip('-')}\n"
        for c, flags in COMMANDS.items()
        for flag in flags.split()
        if flag.startswith("--")
    )
)

SCRIPTS = {"bash": BASH, "zsh": ZSH, "fish": FISH}
