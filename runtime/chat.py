"""Render a conversation with the model's chat template (Jinja, as transformers renders it)."""

from __future__ import annotations


def render_chat(template: str, messages: str | list[dict], bos_token: str | None = None,
                eos_token: str | None = None) -> str:
    """`messages`: a list of {"role", "content"} dicts, or one user prompt as a string."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )
