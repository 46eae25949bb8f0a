"""The official MCP Python SDK as a client of the tollgate MCP gateway (tests/tests/mcp.rs).
Prints one JSON object on stdout.

  tools  --url U [--key K | --bearer T]                   the tool names listed, their schemas
  call   --url U [--key K | --bearer T] --tool T [--args JSON]
  hop    --urls U1,U2,.. --key K --tool T [--args JSON]    one session, each request to the next URL
  burst  --urls U1,U2,.. --key K --tool T --n N            N concurrent calls spread over the URLs
  sample --url U --key K --tool T [--args JSON]            answers the server's sampling request
  listen --url U --key K --tool T [--args JSON]            calls, then waits for a log notification
  resources --url U --key K                               lists resources and prompts, reads the first
Every command takes --traceparent (sent on every request).
"""

import argparse
import asyncio
import contextlib
import json
import warnings

import httpx2
import mcp_types as types

from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

warnings.simplefilter("ignore")


def headers(a) -> dict:
    h = {"traceparent": a.traceparent} if a.traceparent else {}
    if a.bearer:
        h["Authorization"] = f"Bearer {a.bearer}"
    elif a.key:
        h["api-key"] = a.key
    return h


class Rotate(httpx2.AsyncBaseTransport):
    """Sends each request to the next of several gateway replicas (same path), so one MCP
    session moves across replicas; counts the requests each replica got."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.i = 0
        self.inner = httpx2.AsyncHTTPTransport()
        self.served = {p: 0 for p in ports}

    async def handle_async_request(self, request):
        port = self.ports[self.i % len(self.ports)]
        self.i += 1
        self.served[port] += 1
        request.url = request.url.copy_with(port=port)
        return await self.inner.handle_async_request(request)

    async def aclose(self):
        await self.inner.aclose()


def client(url: str, a, transport=None, **kw) -> Client:
    http = httpx2.AsyncClient(
        headers=headers(a),
        timeout=httpx2.Timeout(30, read=60),
        transport=transport,
    )
    return Client(streamable_http_client(url, http_client=http), **kw)


def text_of(result) -> dict:
    texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
    return {"text": "".join(texts), "is_error": bool(result.is_error)}


def err(e: MCPError) -> dict:
    return {"error": {"code": e.error.code, "message": e.error.message, "data": e.error.data}}


def mcp_error(e: BaseException) -> MCPError | None:
    if isinstance(e, MCPError):
        return e
    for inner in getattr(e, "exceptions", ()):
        found = mcp_error(inner)
        if found is not None:
            return found
    return None


async def call(c: Client, tool: str, arguments: dict) -> dict:
    try:
        return {"result": text_of(await c.call_tool(tool, arguments))}
    except MCPError as e:
        return err(e)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--url")
    p.add_argument("--urls")
    p.add_argument("--key")
    p.add_argument("--bearer")
    p.add_argument("--tool")
    p.add_argument("--args", default="{}")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--traceparent")
    a = p.parse_args()
    arguments = json.loads(a.args)
    out: dict = {}
    if a.cmd == "tools":
        async with client(a.url, a) as c:
            listed = (await c.list_tools()).tools
            out["tools"] = sorted(t.name for t in listed)
            out["schemas"] = {t.name: t.input_schema for t in listed}
            out["server"] = c.session.server_info.name if c.session.server_info else None
    elif a.cmd == "call":
        try:
            async with client(a.url, a) as c:
                out = await call(c, a.tool, arguments)
        except BaseException as e:  # an MCPError, maybe inside the transport's task group
            found = mcp_error(e)
            if found is None:
                raise
            out = err(found)
            out["at"] = "connect"

    elif a.cmd == "hop":
        urls = a.urls.split(",")
        ports = [httpx2.URL(u).port for u in urls]
        rotate = Rotate(ports)
        async with client(urls[0], a, transport=rotate) as c:
            out["tools"] = sorted(t.name for t in (await c.list_tools()).tools)
            out["calls"] = [await call(c, a.tool, arguments) for _ in range(len(ports))]
        out["served"] = list(rotate.served.values())
    elif a.cmd == "burst":
        urls = a.urls.split(",")
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(client(u, a)) for u in urls]
            results = await asyncio.gather(
                *(call(clients[i % len(clients)], a.tool, arguments) for i in range(a.n))
            )
        out["ok"] = sum(1 for r in results if "result" in r and not r["result"]["is_error"])
        refused = [r["error"] for r in results if "error" in r]
        out["refused"] = len(refused)
        out["refusals"] = refused[:3]
        out["others"] = [r for r in results if "result" in r and r["result"]["is_error"]][:3]
    elif a.cmd == "resources":
        async with client(a.url, a) as c:
            out["resources"] = sorted(str(r.uri) for r in (await c.list_resources()).resources)
            out["prompts"] = sorted(p.name for p in (await c.list_prompts()).prompts)
            if out["resources"]:
                read = await c.read_resource(out["resources"][0])
                out["read"] = [getattr(x, "text", None) for x in read.contents]
            if out["prompts"]:
                got = await c.get_prompt(out["prompts"][0], {"who": "ada"})
                out["prompt"] = [m.content.text for m in got.messages]
    elif a.cmd == "listen":
        logs: list = []
        got = asyncio.Event()

        async def on_log(params) -> None:
            logs.append({"level": params.level, "data": params.data, "logger": params.logger})
            got.set()

        async with client(a.url, a, logging_callback=on_log, mode="legacy") as c:
            # The client opens its GET stream in the background after `initialize`: a
            # notification the upstream sends before that stream is open is dropped (the spec
            # keeps none without resumability). Call again until one arrives.
            calls = 0
            for _ in range(10):
                out = await call(c, a.tool, arguments)
                calls += 1
                try:
                    await asyncio.wait_for(got.wait(), 1)
                    break
                except asyncio.TimeoutError:
                    pass
            await asyncio.sleep(0.2)
        out["logs"] = logs
        out["calls"] = calls
    elif a.cmd == "sample":

        async def sampling(context, params: types.CreateMessageRequestParams):
            asked = params.messages[0].content.text
            return types.CreateMessageResult(
                role="assistant",
                content=types.TextContent(type="text", text=f"answer to {asked}"),
                model="test-model",
            )

        async with client(a.url, a, sampling_callback=sampling, mode="legacy") as c:
            out = await call(c, a.tool, arguments)
    print(json.dumps(out))


asyncio.run(main())
