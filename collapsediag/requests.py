"""Edit requests: one counterfactual fact, validated so that errors name the record."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import RecordError


@dataclass(frozen=True)
class EditRequest:
    """A fact to write: ``prompt.format(subject)`` should continue with ``target_new``.

    ``prompt`` holds ``{}`` where the subject goes. Targets are stored without the leading
    space; the space is added when the target is tokenised after the prompt.
    """

    case_id: Any
    subject: str
    prompt: str
    target_new: str
    target_true: str = ""
    paraphrase_prompts: tuple[str, ...] = field(default=())
    neighborhood_prompts: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        validate(self)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], case_id: Any = None) -> "EditRequest":
        """Build from a flat dict (subject, prompt, target_new, target_true, ...).

        ``prompt`` is a template with ``{}``; ``prompt_filled`` (the subject written in) is
        accepted instead and turned into a template.
        """
        cid = d.get("case_id", case_id)
        if d.get("_error"):
            raise RecordError(cid, d["_error"])
        for key in ("subject", "target_new"):
            if key not in d or d[key] is None:
                raise RecordError(cid, f"missing field {key!r}")
        subject = _text(cid, d, "subject")
        if d.get("prompt") is not None:
            prompt = _text(cid, d, "prompt")
        elif d.get("prompt_filled") is not None:
            prompt = template_from_filled(_text(cid, d, "prompt_filled"), subject, cid)
        else:
            raise RecordError(cid, "missing field 'prompt'")
        return cls(
            case_id=cid, subject=subject, prompt=prompt,
            target_new=_text(cid, d, "target_new").strip(),
            target_true=_text(cid, d, "target_true").strip() if d.get("target_true") is not None else "",
            paraphrase_prompts=tuple(d.get("paraphrase_prompts") or ()),
            neighborhood_prompts=tuple(d.get("neighborhood_prompts") or ()),
        )


def _text(cid: Any, d: Mapping[str, Any], key: str) -> str:
    value = d[key]
    if isinstance(value, Mapping) and "str" in value:  # CounterFact's {"str": ..., "id": ...}
        value = value["str"]
    if not isinstance(value, str):
        raise RecordError(cid, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def validate(req: EditRequest) -> None:
    """Raise RecordError naming ``req.case_id`` if the request cannot be edited."""
    cid = req.case_id
    if not req.subject.strip():
        raise RecordError(cid, "empty subject")
    if "{}" not in req.prompt:
        raise RecordError(cid, f"prompt has no '{{}}' placeholder for the subject: {req.prompt!r}")
    if req.prompt.count("{}") > 1:
        raise RecordError(cid, f"prompt has more than one '{{}}': {req.prompt!r}")
    try:
        req.prompt.format(req.subject)
    except (IndexError, KeyError, ValueError) as exc:
        raise RecordError(cid, f"prompt is not a valid template ({exc}): {req.prompt!r}") from None
    if not req.target_new.strip():
        raise RecordError(cid, "empty target_new")
    if req.target_true and req.target_new.strip() == req.target_true.strip():
        raise RecordError(cid, "target_new equals target_true")
    for p in req.paraphrase_prompts + req.neighborhood_prompts:
        if not isinstance(p, str) or not p.strip():
            raise RecordError(cid, "empty paraphrase or neighborhood prompt")


def template_from_filled(prompt: str, subject: str, case_id: Any) -> str:
    """Turn a prompt with the subject written in into a template with ``{}``.

    Raises RecordError if the subject does not occur in the prompt.
    """
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        raise RecordError(case_id, "prompt and subject must be non-empty strings")
    pos = prompt.find(subject)
    if pos < 0:
        raise RecordError(case_id, f"subject {subject!r} not in prompt {prompt!r}")
    escaped = prompt.replace("{", "{{").replace("}", "}}")
    pos = escaped.find(subject.replace("{", "{{").replace("}", "}}"))
    n = len(subject.replace("{", "{{").replace("}", "}}"))
    return escaped[:pos] + "{}" + escaped[pos + n:]


def as_request(record: dict[str, Any] | EditRequest, index: int) -> EditRequest:
    """A record as an EditRequest (an EditRequest is kept; a dict is parsed with ``index`` as its case_id)."""
    return record if isinstance(record, EditRequest) else EditRequest.from_dict(record, case_id=index)
