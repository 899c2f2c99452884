"""Find the ``cmw-vllm`` commands in shell examples (README code blocks, --help texts)."""

from __future__ import annotations

import shlex

OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "(", ")"}


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, each as its words, split like a shell would.

    Pipes, ``&&``, ``;`` and redirections separate commands (a redirection's target is
    dropped); quotes are honoured and ``#`` comments removed. ``VAR=value`` prefixes stay
    as the first words.
    """
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not shell after all (or a broken example)
        tokens = line.split()
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in OPERATORS or set(token) <= set("|&;<>()"):
            if token.startswith((">", "<")):
                skip_next = True
            commands.append([])
            continue
        commands[-1].append(token)
    return [c for c in commands if c]


def cmw_vllm_commands(line: str) -> list[tuple[dict[str, str], list[str]]]:
    """The ``cmw-vllm`` invocations on a shell line: (env prefix, arguments after the name)."""
    out = []
    for words in simple_commands(line):
        env: dict[str, str] = {}
        while words and "=" in words[0] and not words[0].startswith("-"):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[:1] == ["cmw-vllm"]:
            out.append((env, words[1:]))
    return out
