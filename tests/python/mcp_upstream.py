"""An upstream MCP server for the MCP gateway tests: the official SDK's MCPServer (FastMCP)
over streamable HTTP on 127.0.0.1:PORT/mcp.

Tools: echo (names the server), add, secret (to test allow-lists), count (counts executions,
for exact limit checks), whoami (the credential headers this request carried), ask (asks the
client to sample: a server-to-client request), announce (a log message on the server's own GET
stream), slow (sleeps). A resource memo://notes and a prompt greet(who). GET /stats returns the number
of executed tool calls and every Authorization / api-key value it was sent.
"""

import argparse
import asyncio
import json
import warnings

import mcp_types as types
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse

from mcp.server.mcpserver import Context, MCPServer

warnings.simplefilter("ignore")

parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()

server = MCPServer(args.name)
stats = {"executed": 0, "authorization": [], "api_key": []}


def seen(ctx: Context) -> None:
    stats["executed"] += 1
    h = ctx.headers or {}
    for k, into in (("authorization", "authorization"), ("api-key", "api_key")):
        if h.get(k) is not None:
            into_list = stats[into]
            if h.get(k) not in into_list:
                into_list.append(h.get(k))


@server.tool()
async def echo(text: str, ctx: Context) -> str:
    """Echoes the text, prefixed with this server's name."""
    seen(ctx)
    return f"{args.name}:{text}"


@server.tool()
async def add(a: int, b: int, ctx: Context) -> int:
    """Adds two numbers."""
    seen(ctx)
    return a + b


@server.tool()
async def secret(ctx: Context) -> str:
    """A tool most consumers may not call."""
    seen(ctx)
    return "the secret"


@server.tool()
async def count(ctx: Context) -> int:
    """Counts its own executions."""
    seen(ctx)
    return stats["executed"]


@server.tool()
async def whoami(ctx: Context) -> str:
    """The credential headers this request carried, as JSON."""
    seen(ctx)
    h = ctx.headers or {}
    return json.dumps({"authorization": h.get("authorization"), "api_key": h.get("api-key")})


@server.tool()
async def ask(question: str, ctx: Context) -> str:
    """Asks the client's model (sampling) and returns its answer."""
    seen(ctx)
    result = await ctx.session.create_message(
        messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=question))],
        max_tokens=20,
        related_request_id=ctx.request_id,
    )
    return f"sampled:{result.content.text}"


@server.tool()
async def announce(text: str, ctx: Context) -> str:
    """Sends a log message outside this request (on the server's own GET stream)."""
    seen(ctx)
    await ctx.session.send_log_message(level="warning", data=text, logger=args.name)
    return "announced"


@server.tool()
async def slow(ms: int, ctx: Context) -> str:
    """Sleeps ms milliseconds."""
    seen(ctx)
    await asyncio.sleep(ms / 1000)
    return "done"


@server.resource("memo://notes")
def notes() -> str:
    """This server's notes."""
    return f"{args.name} notes"


@server.prompt()
def greet(who: str) -> str:
    """A greeting prompt."""
    return f"{args.name} greets {who}"


@server.custom_route("/stats", methods=["GET"])
async def get_stats(_: Request) -> JSONResponse:
    return JSONResponse(stats)


app = server.streamable_http_app()
uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
