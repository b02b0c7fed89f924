"""The one place where CLoRA's error messages get their user-facing form.

Messages raised inside ``clora`` (`SettingsError`, `PromptError`, `LoraError`, `RunnerError`, ...) are plain
sentences without a prefix.  Where a message leaves CLoRA for a person — the WebUI glue (`CloraError`, shown by the UI
and returned by the API), the accordion's notice, the ``/clora/loras`` route, the command line — it goes through
`user_message`, which gives it exactly one ``"CLoRA: "`` prefix followed by a capitalised sentence.  `detail` is the
same message without the prefix, for embedding one message in another ("Failed while preparing the prompts: ...").

An exception that is not a user's mistake (a bug in CLoRA, or an unexpected interaction with the host) reaches the
user as `bug_message`: still one ``"CLoRA: "`` message, which says it is unexpected, names the original exception and
says what to send where; its traceback stays in the console.

Only the exact prefix ``"CLoRA: "`` (and the older ``"CLoRA settings: "`` / ``"clora: error: "`` forms) is taken off
before the prefix is put on, so ``"CLoRA: CLoRA: x"`` cannot happen, while a message that merely starts with an
infotext key such as ``"CLoRA step size: ..."`` keeps its key.
"""
from __future__ import annotations

import re
from typing import Union

__all__ = ["PREFIX", "ISSUES_URL", "user_message", "detail", "bug_message"]

PREFIX = "CLoRA: "
#: Where bug reports go (named in `bug_message`).
ISSUES_URL = "https://github.com/sd-webui-clora/sd-webui-clora/issues"
_OLD_PREFIXES = re.compile(r"^(?:\s*(?:CLoRA: |CLoRA settings: |clora: error: ))+")
# A first word that is an ordinary lower-case English word (not a file name, an identifier or a quoted value).
_PLAIN_FIRST_WORD = re.compile(r"^[a-z]+(?=[\s,;:]|$)")


def detail(error: Union[BaseException, str]) -> str:
    """The message of ``error`` without any ``CLoRA: `` prefix, capitalised; the exception's type name when its
    message is empty."""
    if isinstance(error, BaseException):
        text = str(error).strip() or type(error).__name__
    else:
        text = str(error).strip()
    text = _OLD_PREFIXES.sub("", text).strip()
    if not text:
        return "Unknown error."
    if _PLAIN_FIRST_WORD.match(text):
        text = text[0].upper() + text[1:]
    return text


def user_message(error: Union[BaseException, str]) -> str:
    """``"CLoRA: "`` + the capitalised message of ``error`` (an exception or a text); idempotent."""
    return PREFIX + detail(error)


def bug_message(error: BaseException, doing: str = "generating") -> str:
    """The user-facing message for an unexpected exception ``error`` raised while ``doing`` (e.g. "generating",
    "preparing the prompts"): ``"CLoRA: Unexpected error while <doing> (<Type>: <message>). ..."`` with what to
    send where."""
    text = " ".join(str(error).split()) or "no message"
    if len(text) > 300:
        text = text[:297] + "..."
    return (
        f"{PREFIX}Unexpected error while {doing} ({type(error).__name__}: {text}). This is probably a bug in CLoRA; "
        f"please report it at {ISSUES_URL} with the console output (its traceback), the WebUI version and the "
        "generation parameters; if it also happens with CLoRA off, it is the WebUI's own error."
    )
