"""Render a user prompt with the model's chat template (Jinja, as transformers renders it)."""

from __future__ import annotations


def render_chat(template: str, prompt: str, bos_token: str | None = None, eos_token: str | None = None) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )
