"""The READMEs' Python examples, run as written against the real server (only the URL changed):
a user's first contact with the library is copy-pasting one of them."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

from conftest import REPO, TIMEOUT, Harness, Recorder
from wschat_client import Client, Message

README_URL = "ws://localhost:8080/ws"


def python_blocks(readme: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", readme.read_text(), re.DOTALL | re.MULTILINE)


CLIENT_README = python_blocks(REPO / "clients" / "python" / "README.md")
TOP_README = python_blocks(REPO / "README.md")


async def run_program(code: str, url: str, until: str) -> tuple[bytes, bytes]:
    """Run ``code`` in a Python of its own with ``url`` for the README's; return its output
    once a line contains ``until`` (the examples that stay connected are then stopped)."""
    assert README_URL in code, code
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code.replace(README_URL, url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = b""
    try:
        async with asyncio.timeout(TIMEOUT):
            while until.encode() not in out:
                line = await proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    break
                out += line
    except TimeoutError:
        pass  # the assertion below shows what came instead
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, err = await proc.communicate()
    assert until.encode() in out, (out, err)
    return out, err


async def test_the_first_example_says_hello(harness: Harness) -> None:
    """The client README's first example, and the top README's: join, send, print the echo,
    stay connected."""
    server = await harness.server("memory")
    assert TOP_README and CLIENT_README
    for code in (CLIENT_README[0], TOP_README[0]):
        assert "asyncio.run(main())" in code
        out, err = await run_program(code, server["url"], "#general alice: Hello!")
        assert out == b"#general alice: Hello!\n" and err == b"", (out, err)


async def test_the_sync_example_sends_and_returns(harness: Harness) -> None:
    """SyncClient's example sends, prints its echo (a `Message`) and ends by itself."""
    server = await harness.server("memory")
    code = CLIENT_README[1]
    assert "SyncClient" in code
    out, err = await run_program(code, server["url"], "text='Hi from a script'")
    assert out.startswith(b"Message(id=1, room='general', from_='bob'"), (out, err)


async def run_fragment(code: str, names: dict[str, Any]) -> None:
    """Run a README fragment (top-level `await` allowed) with ``names`` for what it leaves to
    the app."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    done = eval(compile(code, "<README>", "exec", flags=flags), names)
    if done is not None:
        await done


async def test_the_fragments_do_what_they_say(harness: Harness) -> None:
    """The position saved by one run resumes the next run's join after it (the fragment's
    `...`: the app stops, others post); paging back shows every held message once."""
    server = await harness.server("memory")
    [resume] = [c for c in CLIENT_README if "chat.rooms[" in c]
    save_part, load_part = resume.split("\n...\n")
    [paging] = [c for c in CLIENT_README if "while page.truncated" in c]
    kept: list[Any] = []
    async with Client(server["url"], username="ann") as writer:
        await writer.join("general")
        async with Client(server["url"], username="cat") as chat:
            rec = Recorder(chat)
            await chat.join("general")
            for text in ("one", "two", "three"):
                await writer.send("general", text)
            await rec.wait_for(lambda: len(rec.messages["general"]) == 3, what="three messages")
            await run_fragment(save_part, {"chat": chat, "save": lambda *a: kept.append(a)})
        assert [last_id for last_id, _ in kept] == [3]
        await writer.send("general", "four")  # while cat is away
        async with Client(server["url"], username="cat") as chat:
            rec = Recorder(chat)
            await run_fragment(load_part, {"chat": chat, "load": lambda: kept[0]})
            await rec.wait_for(lambda: rec.messages["general"], what="the missed message")
            assert [m.text for m in rec.messages["general"]] == ["four"]
            assert [j.recovered for j in rec.of("joined")] == [True]

            shown: list[int] = []
            await run_fragment(paging, {"chat": chat, "room": "general",
                                        "show": lambda ms: shown.extend(m.id for m in ms)})
            assert shown == [1, 2, 3, 4]


async def test_the_first_page_and_the_live_messages_meet_without_a_double(
        harness: Harness) -> None:
    """The fragment's first page (before the joined's last_id + 1) and the message events
    after the join hold every message once, however the posts of another member interleave
    with the join and the history request."""
    server = await harness.server("memory", env={"RATE_LIMIT": "1000",
                                                 "RATE_LIMIT_BURST": "1000"})
    [first_page] = [c for c in CLIENT_README if "before=joined.last_id + 1" in c]
    async with Client(server["url"], username="ann") as writer:
        await writer.join("general")
        for i in range(20):
            await writer.send("general", f"before {i}")
        async with Client(server["url"], username="cat") as chat:
            rec = Recorder(chat)
            posting = asyncio.gather(*(writer.send("general", f"during {i}")
                                       for i in range(30)))
            names: dict[str, Any] = {"chat": chat, "room": "general"}
            await run_fragment(first_page, names)
            await posting
            await rec.wait_for(lambda: len(rec.messages["general"]) + len(
                names["page"].messages) >= 50, what="every message")
            ids = [m.id for m in names["page"].messages] + rec.ids("general")
            assert ids == list(range(1, 51)), ids


async def test_the_queue_example_answers_one_message_at_a_time(harness: Harness) -> None:
    """The Handlers section's queue: a bot that answers each ``!ping`` in order, awaiting its
    send before it takes the next message, and ends at ``!quit``."""
    server = await harness.server("memory")
    [bot] = [c for c in CLIENT_README if "inbox.put_nowait" in c]
    async with Client(server["url"], username="ann") as user, \
            Client(server["url"], username="bot") as chat:
        rec = Recorder(user)
        await user.join("general")
        running = asyncio.create_task(run_fragment(
            bot, {"chat": chat, "asyncio": asyncio, "Message": Message}))
        await Recorder(chat).wait_for(lambda: "general" in chat.rooms, what="the bot's join")
        await chat.join("general")  # the fragment's join, done
        for text in ("!ping", "hello", "!ping", "!quit"):
            await user.send("general", text)
        await asyncio.wait_for(running, TIMEOUT)
        await rec.wait_for(lambda: len(rec.messages["general"]) == 6, what="the answers")
        texts = [(m.from_, m.text) for m in rec.messages["general"]]
        assert [t for t in texts if t[0] == "ann"] == [
            ("ann", "!ping"), ("ann", "hello"), ("ann", "!ping"), ("ann", "!quit")], texts
        pongs = [i for i, t in enumerate(texts) if t == ("bot", "pong")]
        assert len(pongs) == 2, texts
        for k, at in enumerate(pongs, 1):  # each pong after its ping
            assert [t for t in texts[:at] if t[1] == "!ping"][k - 1:], texts


async def test_the_stream_example_reads_until_quit(harness: Harness) -> None:
    """The ``events()`` example, as written: it prints each message and the position read up
    to (the message's id, in the room's epoch), and its ``async for`` ends at ``!quit``, the
    program with it."""
    server = await harness.server("memory")
    [code] = [c for c in CLIENT_README if "async for event in events" in c]
    assert README_URL in code
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code.replace(README_URL, server["url"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async with asyncio.timeout(TIMEOUT):
            first = await proc.stdout.readline()  # type: ignore[union-attr]
        assert first == b"#general carol: Hello from a stream\n", first
        async with Client(server["url"], username="ann") as ann:
            await ann.join("general")
            await ann.send("general", "!quit")
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = out.decode().splitlines()
    assert err == b"" and proc.returncode == 0, (out, err)
    assert re.fullmatch(r"read up to RoomPosition\(last_id=1, epoch='[^']+'\)", lines[0]), lines
    assert lines[1] == "#general ann: !quit", lines
    assert re.fullmatch(r"read up to RoomPosition\(last_id=2, epoch='[^']+'\)", lines[2]), lines
    assert len(lines) == 3, lines


async def test_the_sync_stream_example_prints_its_message_and_ends(harness: Harness) -> None:
    """``SyncClient.events()``'s example: its ``for`` gets the echo of its send and ends."""
    server = await harness.server("memory")
    [code] = [c for c in CLIENT_README if "for event in events:" in c and "SyncClient" in c]
    out, err = await run_program(code, server["url"], "Hi from a for loop")
    assert out == b"Hi from a for loop\n" and err == b"", (out, err)
