namespace NbdServer.SystemTests;

/// <summary>
/// libnbd's Python shell (<c>/usr/bin/nbdsh</c>) driving the real server: data patterns, flush, trim,
/// zero flags, block status, errors for out-of-range and read-only requests, multi-connection.
/// </summary>
[TestFixture]
[CancelAfter(120_000)]
public sealed class NbdshTests
{
    /// <summary>
    /// Runs <paramref name="body"/> in nbdsh after connecting <c>h</c> to <paramref name="uri"/> with
    /// base:allocation requested. Helpers: <c>extents(offset, length)</c> → [(length, flags)] and
    /// <c>error_of(fn)</c> → "OK" or the errno name of the nbd.Error it raised.
    /// </summary>
    private static async Task<ExternalTool.Result> RunScriptAsync(string uri, string body)
    {
        string prelude = $$"""
            import errno
            URI = "{{uri}}"
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_uri(URI)

            def extents(offset, length):
                found = []
                def callback(meta, start, entries, err):
                    if meta == nbd.CONTEXT_BASE_ALLOCATION:
                        found.extend(zip(entries[0::2], entries[1::2]))
                    return 0
                h.block_status(length, offset, callback)
                return found

            def error_of(operation):
                try:
                    operation()
                    return "OK"
                except nbd.Error as e:
                    return errno.errorcode.get(e.errnum, str(e.errnum))

            """;
        return await RealClient.NbdshAsync(prelude + body + "\nprint(\"SCRIPT-COMPLETED\")\n");
    }

    private static async Task<string[]> RunAndGetLinesAsync(string uri, string body)
    {
        ExternalTool.Result result = await RunScriptAsync(uri, body);
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        string[] lines = result.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.That(lines, Is.Not.Empty.And.Contains("SCRIPT-COMPLETED"), result.ToString());
        return lines[..^1];
    }

    [Test]
    public async Task Pwrite_then_pread_returns_the_same_bytes_at_aligned_and_unaligned_offsets()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            import random
            rng = random.Random(1234)
            cases = [(0, 4096), (4096 * 7, 65536), (1, 1), (511, 1025), (12345, 100000),
                     (1 << 20, 1 << 20), (h.get_size() - 777, 777), (3 * (1 << 20) - 5, 10)]
            expected = bytearray(h.get_size())
            for offset, length in cases:
                data = rng.randbytes(length)
                h.pwrite(data, offset)
                expected[offset:offset + length] = data
            for offset, length in cases:
                assert h.pread(length, offset) == expected[offset:offset + length], (offset, length)
            # A wider read covers the written runs and the zeros between them.
            wide = h.pread(4 << 20, 0)
            assert wide == expected[:4 << 20]
            print("verified", len(cases))
            """);
        Assert.That(lines, Is.EqualTo(new[] { "verified 8" }));
    }

    [Test]
    public async Task Unwritten_ranges_read_as_zeros_and_overwrites_replace_old_data()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "32M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            assert h.pread(1 << 20, 5 << 20) == bytes(1 << 20)
            h.pwrite(b"\xaa" * 8192, 8192)
            h.pwrite(b"\x55" * 100, 8192 + 4000)
            got = h.pread(8192, 8192)
            assert got == b"\xaa" * 4000 + b"\x55" * 100 + b"\xaa" * (8192 - 4100)
            print("checked")
            """);
        Assert.That(lines, Is.EqualTo(new[] { "checked" }));
    }

    [Test]
    public async Task Many_concurrent_aio_writes_and_reads_complete_with_correct_data()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            # 64 writes in flight at once, each a distinct pattern; then 64 reads in flight.
            count, size = 64, 65536
            def wait_for(cookies):
                pending = set(cookies)
                while pending:
                    # aio_command_completed retires a finished command (and raises if it failed).
                    pending = {c for c in pending if not h.aio_command_completed(c)}
                    if pending:
                        h.poll(-1)
            writes = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * size) for i in range(count)]
            wait_for([h.aio_pwrite(writes[i], i * size) for i in range(count)])
            buffers = [nbd.Buffer(size) for _ in range(count)]
            wait_for([h.aio_pread(buffers[i], i * size) for i in range(count)])
            bad = [i for i in range(count) if buffers[i].to_bytearray() != bytes([i + 1]) * size]
            print("mismatches", len(bad))
            """);
        Assert.That(lines, Is.EqualTo(new[] { "mismatches 0" }));
    }

    [Test]
    public async Task Flush_and_fua_writes_succeed_on_a_file_export_and_reach_the_file()
    {
        using var scratch = new ScratchDirectory("nbdsh-flush");
        string image = scratch.File("disk.img");
        using var server = await NbdServerProcess.StartAsync("--file", image, "--size", "16M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            h.pwrite(b"flushed!" * 512, 0)
            h.flush()
            h.pwrite(b"fua-data" * 512, 1 << 20, nbd.CMD_FLAG_FUA)
            print("done")
            """);
        Assert.That(lines, Is.EqualTo(new[] { "done" }));

        // Read the backing file directly while the server still runs: both writes are durable there.
        using var file = new FileStream(image, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        byte[] first = new byte[4096];
        byte[] second = new byte[4096];
        file.ReadExactly(first);
        file.Position = 1 << 20;
        file.ReadExactly(second);
        Assert.Multiple(() =>
        {
            Assert.That(System.Text.Encoding.ASCII.GetString(first), Is.EqualTo(string.Concat(Enumerable.Repeat("flushed!", 512))));
            Assert.That(System.Text.Encoding.ASCII.GetString(second), Is.EqualTo(string.Concat(Enumerable.Repeat("fua-data", 512))));
        });
    }

    [Test]
    public async Task Trim_turns_written_data_back_into_a_zero_hole()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "16M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            h.pwrite(b"\x42" * (1 << 20), 0)
            print("before", extents(0, 1 << 20))
            h.trim(256 * 1024, 256 * 1024)
            print("after", extents(0, 1 << 20))
            assert h.pread(256 * 1024, 256 * 1024) == bytes(256 * 1024)
            assert h.pread(256 * 1024, 0) == b"\x42" * (256 * 1024)
            h.trim(4096, 1 << 20, nbd.CMD_FLAG_FUA)
            print("fua trim ok")
            """);
        Assert.That(lines, Is.EqualTo(new[]
        {
            "before [(1048576, 0)]",
            "after [(262144, 0), (262144, 3), (524288, 0)]",
            "fua trim ok",
        }));
    }

    [Test]
    public async Task Zero_with_each_flag_reads_back_zeros_and_no_hole_keeps_file_blocks_allocated()
    {
        using var scratch = new ScratchDirectory("nbdsh-zero");
        using var server = await NbdServerProcess.StartAsync("--file", scratch.File("disk.img"), "--size", "16M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            K = 65536
            h.pwrite(b"\x01" * (16 * K), 0)
            h.zero(K, 0, nbd.CMD_FLAG_NO_HOLE)
            h.zero(K, K)
            h.zero(K, 2 * K, nbd.CMD_FLAG_FAST_ZERO)
            h.zero(K, 3 * K, nbd.CMD_FLAG_FUA)
            h.zero(1000, 4 * K + 5)          # unaligned, inside data
            assert h.pread(4 * K, 0) == bytes(4 * K)
            assert h.pread(1010, 4 * K) == b"\x01" * 5 + bytes(1000) + b"\x01" * 5
            flags = dict()
            position = 0
            for length, state in extents(0, 4 * K):
                flags[position] = state
                position += length
            print("no-hole range is a hole:", bool(flags[0] & nbd.STATE_HOLE))
            print("plain zero range reads as zero:", all(state & nbd.STATE_ZERO for start, state in flags.items() if K <= start < 4 * K))
            print("fast zero on a sparse range:", error_of(lambda: h.zero(1 << 20, 8 << 20, nbd.CMD_FLAG_FAST_ZERO)))
            """);
        Assert.That(lines, Is.EqualTo(new[]
        {
            "no-hole range is a hole: False",
            "plain zero range reads as zero: True",
            "fast zero on a sparse range: OK",
        }));
    }

    [Test]
    public async Task Block_status_reports_data_and_hole_extents_that_cover_the_request()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "16M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            # The memory volume tracks 64 KiB pages: 4 KiB written makes its page data.
            h.pwrite(b"\x09" * 4096, 1 << 20)
            found = extents(0, 4 << 20)
            print(found)
            assert sum(length for length, _ in found) <= 4 << 20
            one = []
            h.block_status(4 << 20, 0, lambda meta, start, entries, err: one.append(list(entries)) or 0, nbd.CMD_FLAG_REQ_ONE)
            print("req_one", one)
            """);
        Assert.That(lines, Is.EqualTo(new[]
        {
            "[(1048576, 3), (65536, 0), (3080192, 3)]",
            "req_one [[1048576, 3]]",
        }));
    }

    [Test]
    public async Task Out_of_range_requests_fail_with_the_errno_the_spec_requires()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "16M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            h.set_strict_mode(0)
            size = h.get_size()
            print("read past end", error_of(lambda: h.pread(512, size)))
            print("read straddling end", error_of(lambda: h.pread(4096, size - 512)))
            print("trim past end", error_of(lambda: h.trim(4096, size)))
            print("write past end", error_of(lambda: h.pwrite(b"x" * 512, size)))
            print("write straddling end", error_of(lambda: h.pwrite(b"x" * 4096, size - 512)))
            print("zero past end", error_of(lambda: h.zero(4096, size)))
            print("cache past end", error_of(lambda: h.cache(4096, size)))
            print("block status past end", error_of(lambda: extents(size, 4096)))
            # The connection is still usable after all those errors.
            h.pwrite(b"still fine", size - 10)
            print("last bytes", h.pread(10, size - 10).decode())
            # The raised nbd.Error carries the errno the server sent.
            try:
                h.pread(1, size)
            except nbd.Error as e:
                print("pread errno is EINVAL:", e.errnum == errno.EINVAL)
            try:
                h.pwrite(b"y", size)
            except nbd.Error as e:
                print("pwrite errno is ENOSPC:", e.errnum == errno.ENOSPC)
            """);
        Assert.That(lines, Is.EqualTo(new[]
        {
            "read past end EINVAL",
            "read straddling end EINVAL",
            "trim past end EINVAL",
            "write past end ENOSPC",
            "write straddling end ENOSPC",
            "zero past end ENOSPC",
            "cache past end EINVAL",
            "block status past end EINVAL",
            "last bytes still fine",
            "pread errno is EINVAL: True",
            "pwrite errno is ENOSPC: True",
        }));
    }

    [Test]
    public async Task Writes_to_a_read_only_export_fail_with_EPERM_and_reads_still_work()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "16M", "--read-only");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            print("is read only", h.is_read_only())
            h.set_strict_mode(0)
            print("write", error_of(lambda: h.pwrite(b"x" * 4096, 0)))
            print("trim", error_of(lambda: h.trim(4096, 0)))
            print("zero", error_of(lambda: h.zero(4096, 0)))
            print("read", error_of(lambda: h.pread(4096, 0)))
            print("flush", error_of(lambda: h.flush()))
            try:
                h.pwrite(b"x", 0)
            except nbd.Error as e:
                print("errno is EPERM:", e.errnum == errno.EPERM)
            """);
        Assert.That(lines, Is.EqualTo(new[]
        {
            "is read only True",
            "write EPERM",
            "trim EPERM",
            "zero EPERM",
            "read OK",
            "flush OK",
            "errno is EPERM: True",
        }));
    }

    [Test]
    public async Task Write_on_one_connection_flush_on_another_read_on_a_third_sees_the_data()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        string[] lines = await RunAndGetLinesAsync(server.Uri(), """
            print("multi-conn", h.can_multi_conn())
            writer = h
            flusher = nbd.NBD(); flusher.connect_uri(URI)
            reader = nbd.NBD(); reader.connect_uri(URI)
            import random
            data = random.Random(99).randbytes(3 << 20)
            writer.pwrite(data, 5 << 20)
            flusher.flush()
            print("third connection sees the write", reader.pread(len(data), 5 << 20) == data)
            # And the other direction: write via the reader's connection, read via the writer's.
            reader.pwrite(b"\x77" * 4096, 0)
            flusher.flush()
            print("first connection sees the write", writer.pread(4096, 0) == b"\x77" * 4096)
            flusher.shutdown(); reader.shutdown()
            """);
        Assert.That(lines, Is.EqualTo(new[]
        {
            "multi-conn True",
            "third connection sees the write True",
            "first connection sees the write True",
        }));
        Assert.That(server.Log, Does.Contain("Connection 3"), "three connections were attached");
    }

    [Test]
    public async Task Without_structured_replies_reads_and_errors_still_work()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "16M");
        ExternalTool.Result result = await RealClient.NbdshAsync($$"""
            import errno
            h.set_request_structured_replies(False)
            h.connect_uri("{{server.Uri()}}")
            print("structured", h.get_structured_replies_negotiated())
            print("df", h.can_df())
            h.pwrite(b"simple" * 1000, 4096)
            print("read back", h.pread(6000, 4096) == b"simple" * 1000)
            h.set_strict_mode(0)
            try:
                h.pread(512, h.get_size())
            except nbd.Error as e:
                print("past end", errno.errorcode[e.errnum])
            """);
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries), Is.EqualTo(new[]
        {
            "structured False",
            "df False",
            "read back True",
            "past end EINVAL",
        }));
    }
}
