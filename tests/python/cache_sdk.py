"""Cache hits as the official openai SDK sees them: a hit is a normal answer, JSON or stream
(with and without include_usage), for chat, the Responses API and legacy completions.

Usage: python3 cache_sdk.py BASE_URL KEY
Prints one line per check and exits non-zero on the first failure.
"""

import time

from openai import OpenAI

from sdk_checks import Checks, run


def until_hit(call):
    """Repeats a raw-response call until the gateway says it was a cache hit."""
    deadline = time.time() + 5
    while True:
        raw = call()
        if raw.headers.get("x-tollgate-cache") == "hit":
            return raw
        assert time.time() < deadline, raw.headers.get("x-tollgate-cache")
        time.sleep(0.05)


def main(base: str, key: str, checks: Checks) -> None:
    oai = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

    msgs = [{"role": "user", "content": "What does the premium plan include?"}]
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs, max_tokens=8)
    assert raw.headers["x-tollgate-cache"] == "miss", raw.headers
    first = raw.parse()
    hit = until_hit(
        lambda: oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs, max_tokens=8)
    ).parse()
    assert hit.choices[0].message.content == first.choices[0].message.content, hit
    assert hit.usage.completion_tokens == first.usage.completion_tokens, hit
    assert hit.id != first.id
    checks.passed("chat hit ok")

    for include_usage in (False, True):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(
            oai.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=8, stream=True, **extra)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == first.choices[0].message.content, (text, first)
        usage = [c.usage for c in chunks if c.usage]
        if include_usage:
            assert len(usage) == 1 and usage[0].total_tokens == first.usage.total_tokens, usage
        else:
            assert not usage, usage
        assert chunks[-1 if not include_usage else -2].choices[0].finish_reason == first.choices[0].finish_reason
        checks.passed("chat stream hit ok, include_usage", include_usage)

    raw = oai.responses.with_raw_response.create(model="gpt-4o", input="Name three colours.", max_output_tokens=8)
    first = raw.parse()
    hit = until_hit(
        lambda: oai.responses.with_raw_response.create(
            model="gpt-4o", input="Name three colours.", max_output_tokens=8
        )
    ).parse()
    assert hit.output_text == first.output_text and hit.id != first.id, hit
    events = list(oai.responses.create(model="gpt-4o", input="Name three colours.", max_output_tokens=8, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == first.output_text, (text, first.output_text)
    assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens == first.usage.output_tokens
    checks.passed("responses hit ok (json and stream)")

    raw = oai.completions.with_raw_response.create(model="gpt-4o", prompt="Once upon a time", max_tokens=6)
    first = raw.parse()
    hit = until_hit(
        lambda: oai.completions.with_raw_response.create(model="gpt-4o", prompt="Once upon a time", max_tokens=6)
    ).parse()
    assert hit.choices[0].text == first.choices[0].text, hit
    chunks = list(oai.completions.create(model="gpt-4o", prompt="Once upon a time", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text
    checks.passed("completions hit ok (json and stream)")


if __name__ == "__main__":
    run(main)
