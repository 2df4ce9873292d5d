"""The output's chat template: `chat_template: auto` (the most common among the inputs), a
built-in name, or a Jinja template given inline."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from jmerge.engine.inputs import Checked
from jmerge.errors import JmergeError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}


def _template_of(d: Path | None) -> str | None:
    if d is None:
        return None
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    f = d / "tokenizer_config.json"
    if f.exists():
        t = json.loads(f.read_text()).get("chat_template")
        return t if isinstance(t, str) else None
    return None


def resolve_chat_template(c: Checked) -> str | None:
    setting = c.plan.chat_template
    if setting is None:
        return None
    if setting == "auto":
        found = [t for t in (_template_of(m.tokenizer_dir) for m in c.models.values()) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if setting in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[setting]
    if "{%" in setting or "{{" in setting:
        return setting
    raise JmergeError(f"chat_template {setting!r}: not 'auto', a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
                      "or a Jinja template")


def write_chat_template(out: Path, template: str) -> None:
    (out / "chat_template.jinja").write_text(template)
    f = out / "tokenizer_config.json"
    if f.exists():
        conf = json.loads(f.read_text())
        if "chat_template" in conf:
            conf["chat_template"] = template
            f.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
