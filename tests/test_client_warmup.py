"""client_warmup.py: after a burst of bodiless GETs, a POST's request and response objects
keep their attributes inline (no dict of their own), and NAMES is what this aiohttp sets.

Each check runs in a fresh interpreter: the classes' shared keys are per process, and this
test process has made many requests already."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_BURST = textwrap.dedent(
    """
    import asyncio, gc, sys
    import aiohttp
    from aiohttp import web
    from ollama_meter.client_warmup import warm_up

    def inline(obj):
        # An instance whose attributes moved to a dict of its own holds that dict (the one
        # with its "method"); one with inline values holds the values themselves.
        return not any(type(r) is dict and "method" in r for r in gc.get_referents(obj))

    async def main():
        if sys.argv[1] == "warm":
            warm_up()

        async def echo(request):
            await request.read()
            return web.Response(body=b'{"done":true}')

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        seen = {}

        async def ended(session, context, params):
            seen["response"] = inline(params.response)
            requests = [o for o in gc.get_objects() if type(o) is aiohttp.ClientRequest]
            seen["request"] = all(inline(o) for o in requests) and len(requests) == 1

        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(ended)
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:

            async def get(path):
                async with session.get(base + path) as response:
                    await response.read()

            # As the fleet's first poll: three asks to each of three upstreams at once.
            await asyncio.gather(*(get(p) for p in ["/api/version", "/api/ps", "/api/tags"] * 3))
            async with session.post(base + "/api/generate", data=b'{"model":"m"}') as response:
                await response.read()
        await runner.cleanup()
        print(seen["request"], seen["response"])

    asyncio.run(main())
    """
)

_NAMES = textwrap.dedent(
    """
    import asyncio
    import aiohttp
    from aiohttp import web
    from ollama_meter.client_warmup import NAMES

    made = []

    class Request(aiohttp.ClientRequest):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    class Response(aiohttp.ClientResponse):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    async def main():
        async def echo(request):
            await request.read()
            return web.Response(body=b'{"done":true}')

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/generate"
        async with aiohttp.ClientSession(request_class=Request, response_class=Response) as s:
            async with s.post(url, data=b'{"model":"m"}') as response:
                await response.read()
        await runner.cleanup()
        names = dict(NAMES)
        for obj in made:
            base = type(obj).__mro__[1]
            assert set(vars(obj)) == set(names[base]), (base, set(vars(obj)) ^ set(names[base]))
        print("ok")

    asyncio.run(main())
    """
)


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_post_after_a_burst_of_gets_keeps_its_attributes_inline() -> None:
    assert _run(_BURST, "warm") == "True True"


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="3.13 sizes instance values otherwise")
def test_without_it_the_burst_leaves_the_response_a_dict() -> None:
    # What warm_up is for (and proof that the check above can fail).
    assert _run(_BURST, "cold") == "False False"


def test_names_are_what_a_request_with_a_body_leaves() -> None:
    assert _run(_NAMES) == "ok"
