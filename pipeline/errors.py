"""The one exception type users see: a clear message, no traceback, non-zero exit."""


def printable(text: str) -> str:
    """`text` with each character a terminal would not show as itself (NUL, ESC, a lone surrogate from
    undecodable bytes, a TAB) written as its Python escape; line breaks stay."""
    return "".join(
        character if character.isprintable() or character == "\n" else repr(character)[1:-1]
        for character in text
    )


class PipelineError(Exception):
    """Bad input or configuration, reported before expensive work starts. The message is made printable:
    it quotes what a user gave (a key, a file name), which may hold any character."""

    def __init__(self, message: str = "") -> None:
        super().__init__(printable(str(message)))
