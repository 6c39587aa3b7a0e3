using NbdServer.Protocol;

namespace NbdServer.Downstairs.Tests;

/// <summary>The real executable: CLI, TCP, fencing, repair between two processes.</summary>
[CancelAfter(60_000)]
public sealed class ProcessTests
{
    private TempDir _dir = null!;

    [SetUp]
    public void SetUp() => _dir = new TempDir();

    [TearDown]
    public void TearDown() => _dir.Dispose();

    private async Task<string> CreateAsync(string name, string size = "8MiB", string extent = "512")
    {
        string d = _dir.Sub(name);
        var r = await DownstairsProcess.RunToolAsync("create", "--data", d, "--size", size, "--block-size", "4096", "--extent-size", extent);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.Stderr);
        return d;
    }

    [TestCase("--help", "SYNOPSIS")]
    [TestCase("create --help", "--preallocate")]
    [TestCase("run --help", "--max-bytes")]
    [TestCase("info --help", "flush number")]
    public async Task Help_reads_like_a_man_page(string args, string mentions)
    {
        var r = await DownstairsProcess.RunToolAsync(args.Split(' '));
        Assert.That((r.ExitCode, r.Stdout), Is.EqualTo((0, r.Stdout)));
        Assert.That(r.Stdout, Does.Contain("NAME").And.Contain(mentions));
    }

    [Test]
    public async Task Unknown_option_is_a_usage_error()
    {
        var r = await DownstairsProcess.RunToolAsync("create", "--data", _dir.Sub("x"), "--size", "8MiB", "--sise", "1");
        Assert.That((r.ExitCode, r.Stderr.Contains("--sise", StringComparison.Ordinal)), Is.EqualTo((2, true)));
    }

    [Test]
    public async Task Run_on_a_damaged_region_fails_naming_the_file()
    {
        string d = await CreateAsync("r");
        File.Delete(Path.Combine(d, "extents", "e000003.dat"));
        var r = await DownstairsProcess.RunToolAsync("run", "--data", d, "--listen", "127.0.0.1:0");
        Assert.That(r.ExitCode, Is.EqualTo(1));
        Assert.That(r.Stdout + r.Stderr, Does.Contain("e000003.dat").And.Contain("missing"));
    }

    [Test]
    public async Task Write_flush_read_over_tcp_and_info_shows_the_flush()
    {
        string d = await CreateAsync("r");
        await using (DownstairsProcess ds = await DownstairsProcess.StartAsync(d))
        {
            Assert.That(ds.Endpoint.Port, Is.Not.EqualTo(0), "port 0 is reported as the real port");
            await using DownstairsClient c = await ds.ConnectAsync(generation: 6);
            byte[] data = [.. TestData.Block(4096, 513, 1), .. TestData.Block(4096, 514, 1)];
            Assert.That((await c.WriteAsync(1, 513, data)).IsOk, Is.True);
            Assert.That((await c.FlushAsync(2, 11, 6)).IsOk, Is.True);
            byte[] back = new byte[data.Length];
            Assert.That((await c.ReadAsync(3, 513, back)).IsOk, Is.True);
            Assert.That(back, Is.EqualTo(data));
            var info = await DownstairsProcess.RunToolAsync("info", "--data", d);
            Assert.That(info.Stdout, Does.Match(@"\n\s+1\s+6\s+11\s+no"), info.Stdout);
        }
        await using DownstairsProcess again = await DownstairsProcess.StartAsync(d);
        await using DownstairsClient c2 = await again.ConnectAsync(generation: 7);
        Assert.That(c2.Region.Extents[1], Is.EqualTo(new ExtentMeta(6, 11, false)));
        Assert.That(c2.Region.HighestGeneration, Is.EqualTo(7UL));
    }

    [Test]
    public async Task Older_generation_is_refused_and_a_newer_one_fences_the_current_upstairs()
    {
        string d = await CreateAsync("r");
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d);
        await using DownstairsClient g5 = await ds.ConnectAsync(generation: 5);
        Assert.That((await g5.WriteAsync(1, 0, new byte[4096])).IsOk, Is.True);

        var refused = Assert.ThrowsAsync<DownstairsRefusedException>(async () => await ds.ConnectAsync(generation: 3));
        Assert.That(refused!.Result.Code, Is.EqualTo(ResultCode.Fenced));

        await using DownstairsClient g7 = await ds.ConnectAsync(generation: 7);
        Assert.That((await g5.WriteAsync(2, 0, new byte[4096])).Code, Is.EqualTo(ResultCode.Fenced));
        Assert.That((await g5.FlushAsync(3, 1, 5)).Code, Is.EqualTo(ResultCode.Fenced));
        Assert.That((await g7.WriteAsync(1, 0, new byte[4096])).IsOk, Is.True);

        // The fence survives a restart of the downstairs.
        await ds.DisposeAsync();
        await using DownstairsProcess restarted = await DownstairsProcess.StartAsync(d);
        Assert.ThrowsAsync<DownstairsRefusedException>(async () => await restarted.ConnectAsync(generation: 6));
    }

    [Test]
    public async Task Live_repair_copies_an_extent_from_a_healthy_downstairs()
    {
        string healthyDir = await CreateAsync("a");
        string staleDir = await CreateAsync("b");
        await using DownstairsProcess healthy = await DownstairsProcess.StartAsync(healthyDir);
        await using DownstairsProcess stale = await DownstairsProcess.StartAsync(staleDir);
        await using DownstairsClient src = await healthy.ConnectAsync(generation: 2);
        await using DownstairsClient dst = await stale.ConnectAsync(generation: 2);
        for (int b = 512; b < 1024; b += 7)
        {
            await src.WriteAsync((ulong)b, b, TestData.Block(4096, b, 3));
        }
        await dst.WriteAsync(1, 600, TestData.Block(4096, 600, 99)); // divergent, unflushed
        await src.FlushAsync(5000, 8, 2);

        // As the engine does: mark the extent pending, then announce the current flush number (the
        // stale replica missed flush 8; a commit at this generation may claim only flushes it has seen).
        Assert.That((await dst.MarkRepairPendingAsync(4000, [1])).IsOk, Is.True);
        Assert.That((await dst.FlushAsync(4001, 8, 2)).IsOk, Is.True);
        const int chunk = 128;
        for (int first = 0; first < 512; first += chunk)
        {
            byte[] ctx = new byte[chunk * 16];
            byte[] data = new byte[chunk * 4096];
            ExtentReadResult read = await src.ReadExtentAsync((ulong)(6000 + first), new ExtentRange(1, first, chunk), ctx, data);
            Assert.That(read.Result.IsOk, Is.True, read.Result.ToString());
            var w = await dst.WriteExtentAsync((ulong)(7000 + first), new ExtentRange(1, first, chunk, first == 0 ? ExtentRange.BeginFlag : 0), ctx, data);
            Assert.That(w.IsOk, Is.True, w.ToString());
        }
        Assert.That((await dst.CommitExtentAsync(8000, 1, new ExtentMeta(2, 8, false))).IsOk, Is.True);

        byte[] a = new byte[512 * 4096];
        byte[] b2 = new byte[512 * 4096];
        await src.ReadAsync(9000, 512, a);
        await dst.ReadAsync(9000, 512, b2);
        Assert.That(b2, Is.EqualTo(a));
        await dst.DisposeAsync();
        await stale.DisposeAsync();
        var info = await DownstairsProcess.RunToolAsync("info", "--data", staleDir);
        Assert.That(info.Stdout, Does.Match(@"\n\s+1\s+2\s+8\s+no"), info.Stdout);
    }

    [Test]
    public async Task Metrics_endpoint_counts_jobs_bytes_errors_and_latency_by_op()
    {
        string d = await CreateAsync("r");
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d, ["--metrics", "127.0.0.1:0"]);
        string line = ds.Lines.First(l => l.Contains("/metrics", StringComparison.Ordinal));
        int port = int.Parse(System.Text.RegularExpressions.Regex.Match(line, @"127\.0\.0\.1:(\d+)/metrics").Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
        await using (DownstairsClient c = await ds.ConnectAsync())
        {
            for (int i = 0; i < 4; i++)
            {
                Assert.That((await c.WriteAsync((ulong)i + 1, i, TestData.Block(4096, i, 1))).IsOk, Is.True);
            }
            Assert.That((await c.FlushAsync(10, 1, 1)).IsOk, Is.True);
        }
        await using (DownstairsClient ro = await ds.ConnectAsync(readOnly: true))
        {
            Assert.That((await ro.WriteAsync(1, 0, TestData.Block(4096, 0, 1))).Code, Is.EqualTo(ResultCode.ReadOnly));
        }

        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };
        string text = await http.GetStringAsync(new Uri($"http://127.0.0.1:{port}/metrics"));
        Assert.Multiple(() =>
        {
            Assert.That(Value(text, "nbd_downstairs_jobs_total{op=\"write\"}"), Is.EqualTo(5), text);
            Assert.That(Value(text, "nbd_downstairs_errors_total{op=\"write\"}"), Is.EqualTo(1), "the read-only connection's write");
            Assert.That(Value(text, "nbd_downstairs_bytes_total{op=\"write\"}"), Is.EqualTo(4 * 4096), "bytes of the successful writes");
            Assert.That(Value(text, "nbd_downstairs_jobs_total{op=\"flush\"}"), Is.EqualTo(1));
            Assert.That(Value(text, "nbd_downstairs_job_duration_seconds_count{op=\"flush\"}"), Is.EqualTo(1));
            Assert.That(text, Does.Contain("# TYPE nbd_downstairs_job_duration_seconds histogram"));
        });
    }

    private static double Value(string text, string series)
    {
        string? line = text.Split('\n').FirstOrDefault(l => l.StartsWith(series + " ", StringComparison.Ordinal));
        Assert.That(line, Is.Not.Null, $"no series {series} in:\n{text}");
        return double.Parse(line![(series.Length + 1)..], System.Globalization.CultureInfo.InvariantCulture);
    }
}
