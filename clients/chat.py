"""The official OpenAI SDK against a LaDi server, with LaDi's extensions through extra_body.

    python -m clients.chat [--base-url http://127.0.0.1:8000/v1] [--api-key KEY] ["Make 23 from 3 4 5 2."]
"""
from __future__ import annotations

import argparse

from openai import OpenAI


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m clients.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", default="Make 23 from 3 4 5 2.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    a = p.parse_args(argv)
    client = OpenAI(base_url=a.base_url, api_key=a.api_key)
    model = client.models.list().data[0].id

    # 1. Four answers, each from a different latent plan.
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": a.question}],
                                       n=4, max_tokens=96, seed=0, extra_body={"latent_plans": 4})
    for c in r.choices:
        print(f"plan {c.plan_index}: {c.message.content!r}")

    # 2. Best of 16, ranked by majority vote over the extracted answers.
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": a.question}],
                                       n=1, max_tokens=96, extra_body={"mode": "best_of_n", "best_of": 16})
    print(f"best of 16 (vote share {r.choices[0].score:.2f}): {r.choices[0].message.content!r}")

    # 3. Streaming.
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": a.question}],
                                            max_tokens=96, stream=True, stream_options={"include_usage": True})
    print("streamed: ", end="")
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n({chunk.usage.completion_tokens} tokens)")


if __name__ == "__main__":
    main()
