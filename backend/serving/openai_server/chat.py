"""The base model's chat template (tokenizer_config.json `chat_template`, or chat_template.jinja beside it),
rendered the way transformers' apply_chat_template renders it: a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a non-escaping `tojson`, and the
tokenizer's special tokens as variables."""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_template(model_dir: Path) -> tuple[str | None, dict[str, str]]:
    """(the chat template or None, the special tokens' texts) of a model folder."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    special = {name: _token_text(config[name]) for name in SPECIAL_TOKENS if _token_text(config.get(name))}
    return template, special


class ChatTemplate:
    def __init__(self, template: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(template)
        self.special_tokens = special_tokens

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Raises jinja2.TemplateError where the template refuses the conversation."""
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )
