"""Drives a running tollgate with the official openai SDK (OpenAI and AzureOpenAI clients).

Usage: python3 sdk_compat.py BASE_URL KEY
Prints one line per check and exits non-zero on the first failure.
"""

import openai
from openai import AzureOpenAI, OpenAI

from sdk_checks import Checks, run


def main(base: str, key: str, checks: Checks) -> None:

    oai = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    r = oai.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], max_tokens=5
    )
    assert r.choices[0].message.content, r
    assert r.usage.completion_tokens == 5, r.usage
    checks.passed("openai chat non-stream ok", r.usage.prompt_tokens, r.usage.completion_tokens)

    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Stream"}], max_tokens=6, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), chunks
    assert all(c.usage is None for c in chunks), "usage chunk leaked to a client that did not ask"
    checks.passed("openai chat stream ok", repr(text))

    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Stream"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == 6, chunks[-1]
    checks.passed("openai chat stream include_usage ok")

    e = oai.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])
    assert len(e.data) == 2 and e.usage.prompt_tokens > 0, e
    checks.passed("openai embeddings ok")

    az = AzureOpenAI(azure_endpoint=base, api_key=key, api_version="2024-10-21", max_retries=0)
    r = az.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi Azure"}], max_tokens=4
    )
    assert r.usage.completion_tokens == 4, r
    checks.passed("azure chat non-stream ok")

    chunks = list(
        az.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), chunks
    checks.passed("azure chat stream ok", repr(text))

    e = az.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(e.data) == 1, e
    checks.passed("azure embeddings ok")

    for client in (
        OpenAI(base_url=f"{base}/v1", api_key="wrong-key", max_retries=0),
        AzureOpenAI(azure_endpoint=base, api_key="wrong-key", api_version="2024-10-21", max_retries=0),
    ):
        try:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        except openai.AuthenticationError as err:
            assert err.status_code == 401
            assert "wrong-key" not in str(err)
        else:
            raise AssertionError("a bad key was accepted")
    checks.passed("bad key raises AuthenticationError ok")

    try:
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as err:
        assert err.code == "model_not_found", err
    else:
        raise AssertionError("unknown model accepted")
    checks.passed("unknown model raises NotFoundError ok")


if __name__ == "__main__":
    run(main)
