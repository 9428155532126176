"""Output capture: byte-exact, ordered, concurrent readers, follow mode, cleanup, cap."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

from jobworker.runtime import Runtime, State, Stream

from ..conftest import make_config, next_job_made
from .helpers import collect, joined, py, read_until


async def test_streams_merged_in_write_order_and_each_alone(runtime: Runtime) -> None:
    # Each write waits until the supervisor has drained the pipe (FIONREAD == 0) before the
    # next one: that is when the order across two pipes is defined. (Writes to both streams
    # within the same microseconds are logged in the order the supervisor read them.)
    code = """
        import fcntl, os, struct, termios
        for i in range(50):
            fd = 1 if i % 2 == 0 else 2
            os.write(fd, b'%d\\n' % i)
            while struct.unpack('i', fcntl.ioctl(fd, termios.FIONREAD, b'\\0' * 4))[0]:
                os.sched_yield()
        os.write(1, b''.join(b'burst %d\\n' % i for i in range(1000)))
    """
    async with asyncio.timeout(30):
        job = await runtime.run(py(code))
        await runtime.wait(job.id)
        merged = await collect(runtime, job.id)
        out = await collect(runtime, job.id, stderr=False)
        err = await collect(runtime, job.id, stdout=False)
    burst = b"".join(b"burst %d\n" % i for i in range(1000))
    assert joined(merged) == b"".join(b"%d\n" % i for i in range(50)) + burst
    assert [c.stream for c in merged[:50]] == [
        Stream.STDOUT if i % 2 == 0 else Stream.STDERR for i in range(50)
    ]
    assert joined(out) == b"".join(b"%d\n" % i for i in range(0, 50, 2)) + burst
    assert joined(err) == b"".join(b"%d\n" % i for i in range(1, 50, 2))
    stamps = [c.timestamp_ns for c in merged]
    assert stamps == sorted(stamps)


async def test_random_binary_round_trips_byte_exact(runtime: Runtime, public_dir: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024) + b"\0\xff\xfe\x00invalid utf-8 \xc3\x28"
    src = public_dir / "payload"
    src.write_bytes(payload)
    src.chmod(0o644)
    async with asyncio.timeout(30):
        copy = "import sys, shutil; shutil.copyfileobj(open(sys.argv[1], 'rb'), sys.stdout.buffer)"
        job = await runtime.run(py(copy, str(src)))
        data = joined(await collect(runtime, job.id))
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()


async def test_no_trailing_newline_is_kept(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py("import sys; sys.stdout.write('no newline')"))
        assert joined(await collect(runtime, job.id)) == b"no newline"


async def test_single_10mb_line(runtime: Runtime) -> None:
    async with asyncio.timeout(60):
        job = await runtime.run(py("import sys; sys.stdout.write('x' * 10_000_000)"))
        data = joined(await collect(runtime, job.id))
    assert data == b"x" * 10_000_000


async def test_100mb_of_output(runtime: Runtime) -> None:
    code = """
        import os
        block = bytes(range(256)) * 4096
        for _ in range(100):
            os.write(1, block)
    """
    expected = hashlib.sha256(bytes(range(256)) * 4096 * 100).hexdigest()
    async with asyncio.timeout(120):
        job = await runtime.run(py(code))
        digest = hashlib.sha256()
        size = 0
        async with contextlib.aclosing(runtime.output(job.id, follow=True)) as it:
            async for chunk in it:
                digest.update(chunk.data)
                size += len(chunk.data)
    assert size == 100 * 1024 * 1024
    assert digest.hexdigest() == expected


async def test_50_concurrent_followers_get_identical_output(runtime: Runtime) -> None:
    code = """
        import os, sys
        for i in range(2000):
            os.write(1 + i % 2, b'line %d of a chatty job\\n' % i)
    """
    async with asyncio.timeout(120):
        job = await runtime.create(py(code))
        followers = [asyncio.ensure_future(collect(runtime, job.id)) for _ in range(50)]
        await runtime.start(job.id)
        results = await asyncio.gather(*followers)
        snapshot = await collect(runtime, job.id, follow=False)
    expected_out = b"".join(b"line %d of a chatty job\n" % i for i in range(0, 2000, 2))
    expected_err = b"".join(b"line %d of a chatty job\n" % i for i in range(1, 2000, 2))
    assert joined(snapshot, Stream.STDOUT) == expected_out
    assert joined(snapshot, Stream.STDERR) == expected_err
    for chunks in results:
        assert chunks == snapshot


async def test_follower_after_end_gets_everything_and_ends(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py("print('a'); import sys; print('b', file=sys.stderr)"))
        await runtime.wait(job.id)
        chunks = await collect(runtime, job.id, follow=True)
    assert joined(chunks, Stream.STDOUT) == b"a\n"
    assert joined(chunks, Stream.STDERR) == b"b\n"


async def test_grandchild_holding_stdout_does_not_keep_job_alive(runtime: Runtime) -> None:
    code = """
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(1000)  # holds stdout open
        print('parent done', flush=True)
    """
    async with asyncio.timeout(30):
        job = await runtime.run(py(code))
        followers = [asyncio.ensure_future(collect(runtime, job.id)) for _ in range(3)]
        final = await runtime.wait(job.id)
        results = await asyncio.gather(*followers)
    assert final.state is State.EXITED
    assert final.exit_code == 0
    for chunks in results:
        assert joined(chunks) == b"parent done\n"


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_cancelled_reader_leaves_nothing_behind(runtime: Runtime) -> None:
    async with asyncio.timeout(30):
        job = await runtime.run(py("import os\nwhile True: os.write(1, b'y' * 100)"))
        await read_until(runtime, job.id, b"yyy")
        await next_job_made(runtime)
        fds_before, tasks_before = _fds(), asyncio.all_tasks()
        got_data = asyncio.Event()

        async def reader() -> None:
            async for _chunk in runtime.output(job.id, follow=True):
                got_data.set()

        task = asyncio.ensure_future(reader())
        await got_data.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert _fds() == fds_before
        assert asyncio.all_tasks() == tasks_before
        assert runtime.notifier.watch_count == 0
        await runtime.stop(job.id, grace=0)


async def test_slow_reader_does_not_block_the_job(runtime: Runtime) -> None:
    code = """
        import os
        for _ in range(64):
            os.write(1, b'z' * 65536)
        print('all written', flush=True)
    """
    async with asyncio.timeout(30):
        job = await runtime.run(py(code))
        # Open a reader and take one chunk only; the job must still finish on its own.
        async with contextlib.aclosing(runtime.output(job.id, follow=True)) as it:
            await anext(it)
            final = await runtime.wait(job.id)
    assert final.exit_code == 0


async def test_output_cap_truncates_with_marker_and_job_keeps_running(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state", output_limit=1000)
    code = """
        import os, sys
        for _ in range(100):
            os.write(1, b'a' * 100)
        sys.exit(5)
    """
    async with asyncio.timeout(30), await Runtime.open(config) as rt:
        job = await rt.run(py(code))
        final = await rt.wait(job.id)
        chunks = await collect(rt, job.id, stderr=False)
    assert final.exit_code == 5
    assert final.output_truncated
    assert joined(chunks, Stream.STDOUT) == b"a" * 1000
    notes = joined(chunks, Stream.SYSTEM)
    assert b"output truncated" in notes
    assert b"1000 byte" in notes
