using System.Buffers.Binary;
using System.Diagnostics;
using NbdServer.Common.Posix;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// DESIGN §6 at the scale of one downstairs: real fsync errors, a real full filesystem, kill -9.
/// Each test bounds its loops by count and by time.
/// </summary>
[NonParallelizable]
public sealed class IncidentTests
{
    private TempDir _dir = null!;

    [SetUp]
    public void SetUp() => _dir = new TempDir();

    [TearDown]
    public void TearDown() => _dir.Dispose();

    private static async Task<string> CreateAsync(string dir, string size = "8MiB", string extent = "512")
    {
        var r = await DownstairsProcess.RunToolAsync("create", "--data", dir, "--size", size, "--block-size", "4096", "--extent-size", extent);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.Stderr);
        return dir;
    }

    /// <summary>
    /// An LD_PRELOAD interposer makes fsync/fdatasync fail with EIO while a trigger file exists —
    /// the exact failure .NET's own FlushToDisk swallows (DESIGN §9).
    /// </summary>
    [Test]
    [CancelAfter(60_000)]
    public async Task Failed_fsync_is_reported_as_an_error_never_as_durable()
    {
        string so = _dir.Sub("failfsync.so");
        File.WriteAllText(_dir.Sub("failfsync.c"), """
            #define _GNU_SOURCE
            #include <dlfcn.h>
            #include <errno.h>
            #include <stdlib.h>
            #include <unistd.h>
            static int failing(void) { const char *p = getenv("FAIL_FSYNC_WHEN"); return p && access(p, F_OK) == 0; }
            int fsync(int fd) { if (failing()) { errno = EIO; return -1; } return ((int (*)(int))dlsym(RTLD_NEXT, "fsync"))(fd); }
            int fdatasync(int fd) { if (failing()) { errno = EIO; return -1; } return ((int (*)(int))dlsym(RTLD_NEXT, "fdatasync"))(fd); }
            """);
        using (Process gcc = Process.Start("gcc", ["-shared", "-fPIC", "-O2", "-o", so, _dir.Sub("failfsync.c"), "-ldl"]))
        {
            await gcc.WaitForExitAsync();
            Assert.That(gcc.ExitCode, Is.EqualTo(0), "gcc builds the interposer");
        }
        string d = await CreateAsync(_dir.Sub("r"));
        string trigger = _dir.Sub("fail-fsync");
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d, environment: new Dictionary<string, string> { ["LD_PRELOAD"] = so, ["FAIL_FSYNC_WHEN"] = trigger });
        await using DownstairsClient c = await ds.ConnectAsync(generation: 1);
        Assert.That((await c.WriteAsync(1, 10, TestData.Block(4096, 10, 1))).IsOk, Is.True);

        File.WriteAllText(trigger, "");
        DownstairsResult flush = await c.FlushAsync(2, 1, 1);
        Assert.That((flush.Code, flush.Errno), Is.EqualTo((ResultCode.IoError, Errnos.EIO)), flush.ToString());

        // Linux drops the failed pages; a later fsync could "succeed" without the data. The extent
        // stays poisoned (and dirty) until live repair, so the next flush must fail too.
        File.Delete(trigger);
        DownstairsResult again = await c.FlushAsync(3, 2, 1);
        Assert.That(again.Code, Is.EqualTo(ResultCode.IoError), again.ToString());
        Assert.That(again.Message, Does.Contain("needs repair"));
        byte[] ctx = new byte[512 * 16];
        byte[] data = new byte[512 * 4096];
        ExtentReadResult state = await c.ReadExtentAsync(4, new ExtentRange(0, 0, 512), ctx, data);
        Assert.That(state.Meta.Dirty, Is.True);

        // Once a live repair has marked it pending, flushes go on (the replica keeps step while it
        // is repaired) and leave the poisoned extent unstamped.
        Assert.That((await c.MarkRepairPendingAsync(5, [0])).IsOk, Is.True);
        Assert.That((await c.FlushAsync(6, 3, 1)).IsOk, Is.True, "a flush is not refused for a poisoned extent that is being repaired");
        Assert.That((await c.ReadExtentAsync(7, new ExtentRange(0, 0, 512), ctx, data)).Meta.Dirty, Is.True, "and does not stamp it");

        // Repair (here: from its own contents, standing in for a healthy replica) clears it.
        await c.WriteExtentAsync(8, new ExtentRange(0, 0, 512, ExtentRange.BeginFlag), ctx, data);
        Assert.That((await c.CommitExtentAsync(9, 0, new ExtentMeta(1, 3, false))).IsOk, Is.True);
        Assert.That((await c.FlushAsync(10, 4, 1)).IsOk, Is.True);
    }

    /// <summary>Builds test/Shared/faultio.c (the LD_PRELOAD write/flush fault injector) into the test's directory.</summary>
    private async Task<string> BuildFaultIoAsync()
    {
        string so = _dir.Sub("faultio.so");
        using (Process gcc = Process.Start("gcc", ["-shared", "-fPIC", "-O2", "-o", so, Path.Combine(AppContext.BaseDirectory, "faultio.c"), "-ldl"]))
        {
            await gcc.WaitForExitAsync();
            Assert.That(gcc.ExitCode, Is.EqualTo(0), "gcc builds the interposer");
        }
        return so;
    }

    /// <summary>
    /// A poisoned extent (a failed fdatasync: the kernel dropped pages of it) cannot be caught up in
    /// place, whatever the catch-up rewrote. It is reported uncertain, also after a restart that
    /// forgot the poisoning, until a staged whole copy replaces it.
    /// </summary>
    [Test]
    [CancelAfter(60_000)]
    public async Task Poisoned_extent_refuses_an_in_place_commit_and_stays_uncertain_across_a_restart()
    {
        string d = await CreateAsync(_dir.Sub("r"));
        string trigger = _dir.Sub("fail-flushes");
        string so = await BuildFaultIoAsync();
        await using (DownstairsProcess ds = await DownstairsProcess.StartAsync(d, environment: new Dictionary<string, string> { ["LD_PRELOAD"] = so, ["FAULTIO_FLUSHES_WHEN"] = trigger }))
        {
            await using DownstairsClient c = await ds.ConnectAsync(generation: 1);
            Assert.That((await c.WriteAsync(1, 10, TestData.Block(4096, 10, 1))).IsOk, Is.True);
            File.WriteAllText(trigger, "");
            Assert.That((await c.FlushAsync(2, 1, 1)).Code, Is.EqualTo(ResultCode.IoError));
            File.Delete(trigger);

            Assert.That((await c.MarkRepairPendingAsync(3, [0])).IsOk, Is.True);
            Assert.That((await c.WriteAsync(4, 10, TestData.Block(4096, 10, 2))).IsOk, Is.True);
            DownstairsResult inPlace = await c.CommitExtentAsync(5, 0, new ExtentMeta(1, 1, false), inPlace: true);
            Assert.That(inPlace.Code, Is.EqualTo(ResultCode.IoError), inPlace.ToString());
            Assert.That(inPlace.Message, Does.Contain("staged whole copy"));
            await using DownstairsClient probe = await ds.ConnectAsync(generation: 1, readOnly: true);
            Assert.That(probe.Region.Extents[0], Is.EqualTo(new ExtentMeta(0, 0, true, Uncertain: true)), "refused: the record is as it was");
        }

        await using DownstairsProcess again = await DownstairsProcess.StartAsync(d);
        await using DownstairsClient writer = await again.ConnectAsync(generation: 2);
        Assert.That(writer.Region.Extents[0], Is.EqualTo(new ExtentMeta(0, 0, true, Uncertain: true)), "the same boot, yet still uncertain: the mark was recorded");
        Assert.That(writer.Region.Extents[1].Uncertain, Is.False);

        byte[] ctx = new byte[512 * 16];
        byte[] data = new byte[512 * 4096];
        Assert.That((await writer.MarkRepairPendingAsync(1, [0])).IsOk, Is.True);
        Assert.That((await writer.WriteExtentAsync(2, new ExtentRange(0, 0, 512, ExtentRange.BeginFlag), ctx, data)).IsOk, Is.True);
        Assert.That((await writer.CommitExtentAsync(3, 0, new ExtentMeta(1, 1, false))).IsOk, Is.True);
        await using DownstairsClient after = await again.ConnectAsync(generation: 2, readOnly: true);
        Assert.That(after.Region.Extents[0], Is.EqualTo(new ExtentMeta(1, 1, false)), "a staged whole copy replaced it");
    }

    [Test]
    [CancelAfter(60_000)]
    public async Task Injected_write_errors_come_back_at_once_and_the_log_stays_short()
    {
        string d = await CreateAsync(_dir.Sub("r"));
        string trigger = _dir.Sub("fail-writes");
        string so = await BuildFaultIoAsync();
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d, ["--log-interval", "1"], new Dictionary<string, string> { ["LD_PRELOAD"] = so, ["FAULTIO_WRITES_WHEN"] = trigger });
        await using DownstairsClient c = await ds.ConnectAsync();
        File.WriteAllText(trigger, "ENOSPC");
        int linesBefore = ds.Lines.Count;
        byte[] block = TestData.Block(4096, 1, 1);
        var sw = Stopwatch.StartNew();
        int failed = 0;
        for (int batch = 0; batch < 40 && sw.Elapsed < TimeSpan.FromSeconds(10); batch++)
        {
            DownstairsResult[] rs = await Task.WhenAll(Enumerable.Range(0, 64).Select(i => c.WriteAsync((ulong)((batch * 64) + i + 1), i, block)));
            failed += rs.Count(r => r.Code == ResultCode.NoSpace && r.Errno == Errnos.ENOSPC);
        }
        Assert.That(failed, Is.EqualTo(40 * 64), "every write reports ENOSPC");
        Assert.That(sw.Elapsed, Is.LessThan(TimeSpan.FromSeconds(10)), "errors return promptly");
        await Task.Delay(1500);
        Assert.That(ds.Lines.Count - linesBefore, Is.InRange(1, 12), string.Join("\n", ds.Lines));
        Assert.That(ds.Lines, Has.Some.Contains("repeated"));

        File.Delete(trigger);
        Assert.That((await c.WriteAsync(100_000, 1, block)).IsOk, Is.True);
        Assert.That((await c.FlushAsync(100_001, 1, 1)).IsOk, Is.True);
    }

    /// <summary>
    /// kill -9 at random moments under pipelined writes + flushes; after each restart every block
    /// whose write was flushed reads back exactly, and only the batch in flight may differ.
    /// </summary>
    [Test]
    [CancelAfter(120_000)]
    public async Task Kill_9_mid_load_never_loses_a_flushed_write()
    {
        const int bs = 4096;
        string d = await CreateAsync(_dir.Sub("r"), "16MiB", "1024");
        var durable = new Dictionary<long, long>(); // block → version known flushed
        var rng = new Random(1234);
        long version = 0;
        ulong generation = 1;
        var budget = Stopwatch.StartNew();
        int kills = 0;
        for (int round = 0; round < 6 && budget.Elapsed < TimeSpan.FromSeconds(60); round++, generation++)
        {
            await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d);
            await using DownstairsClient c = await ds.ConnectAsync(generation);

            // Verify everything known durable so far (the region opened, so metadata survived).
            foreach ((long block, long v) in durable)
            {
                byte[] back = new byte[bs];
                byte[] hash = new byte[8];
                Assert.That((await c.ReadAsync(1, block, back, hash)).IsOk, Is.True);
                Assert.That(back, Is.EqualTo(TestData.Block(bs, block, v)), $"round {round}: flushed block {block} v{v}");
                Assert.That(BlockContext.Verify(back, BinaryPrimitives.ReadUInt64LittleEndian(hash)), Is.True);
            }

            int killAfterMs = rng.Next(150, 700);
            var loadTime = Stopwatch.StartNew();
            Dictionary<long, long>? inFlight = null;
            Task killer = Task.Run(async () =>
            {
                await Task.Delay(killAfterMs);
                ds.KillHard();
            });
            ulong job = 10;
            try
            {
                while (loadTime.Elapsed < TimeSpan.FromSeconds(5))
                {
                    // A batch of 32 distinct blocks in flight at once, then a flush.
                    inFlight = [];
                    while (inFlight.Count < 32)
                    {
                        inFlight[rng.NextInt64(4096)] = ++version;
                    }
                    DownstairsResult[] rs = await Task.WhenAll(inFlight.Select(kv => c.WriteAsync(++job, kv.Key, TestData.Block(bs, kv.Key, kv.Value))));
                    Assert.That(rs.Select(r => r.Code), Is.All.EqualTo(ResultCode.Ok));
                    DownstairsResult f = await c.FlushAsync(++job, job, generation);
                    Assert.That(f.IsOk, Is.True);
                    foreach ((long block, long v) in inFlight)
                    {
                        durable[block] = v;
                    }
                    inFlight = null;
                }
            }
            catch (DownstairsConnectionException)
            {
                kills++;
            }
            await killer;
            // Blocks of the batch that was in flight may be old, new or torn: forget their durable value.
            if (inFlight is not null)
            {
                foreach (long block in inFlight.Keys)
                {
                    durable.Remove(block);
                }
            }
        }
        Assert.That(kills, Is.GreaterThanOrEqualTo(3), "the process was really killed mid-load");
        Assert.That(durable.Count, Is.GreaterThan(100), "enough flushed blocks were checked");

        // Final check after the last kill.
        await using DownstairsProcess last = await DownstairsProcess.StartAsync(d);
        await using DownstairsClient lc = await last.ConnectAsync(generation);
        foreach ((long block, long v) in durable)
        {
            byte[] back = new byte[bs];
            await lc.ReadAsync(1, block, back);
            Assert.That(back, Is.EqualTo(TestData.Block(bs, block, v)), $"flushed block {block}");
        }
    }

    /// <summary>
    /// A real full filesystem (64 MiB tmpfs, filled with a ballast file): writes fail with ENOSPC
    /// promptly, memory and log stay flat, and writes work again once space is freed.
    /// </summary>
    [Test]
    [CancelAfter(90_000)]
    public async Task Full_disk_errors_are_prompt_bounded_and_recover()
    {
        string mount = _dir.Sub("tmpfs");
        Directory.CreateDirectory(mount);
        if (await Sh("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount) != 0)
        {
            Assert.Ignore("needs root to mount a tmpfs");
        }
        try
        {
            string d = await CreateAsync(Path.Combine(mount, "r"), "48MiB", "2048");
            string ballast = Path.Combine(mount, "ballast");
            await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d, ["--log-interval", "2"]);
            await using DownstairsClient c = await ds.ConnectAsync();
            byte[] block = TestData.Block(4096, 0, 1);
            Assert.That((await c.WriteAsync(1, 0, block)).IsOk, Is.True, "healthy before the disk fills");
            Assert.That((await c.FlushAsync(2, 1, 1)).IsOk, Is.True);

            FillUp(ballast);
            await Task.Delay(500);
            long rssBefore = ds.RssBytes();
            int linesBefore = ds.Lines.Count;
            var storm = Stopwatch.StartNew();
            long failures = 0, maxLatencyMs = 0;
            ulong job = 100;
            long nextBlock = 2048; // untouched extents: every write needs new space
            byte[] big = new byte[256 << 10];
            while (storm.Elapsed < TimeSpan.FromSeconds(8))
            {
                var sw = Stopwatch.StartNew();
                DownstairsResult[] rs = await Task.WhenAll(Enumerable.Range(0, 16).Select(_ =>
                {
                    long b = Interlocked.Add(ref nextBlock, 64) % (12 * 1024);
                    return c.WriteAsync(Interlocked.Increment(ref job), 2048 + b, big);
                }));
                maxLatencyMs = Math.Max(maxLatencyMs, sw.ElapsedMilliseconds);
                failures += rs.Count(r => r.Code == ResultCode.NoSpace);
            }
            long rssGrowth = ds.RssBytes() - rssBefore;
            await Task.Delay(2500); // let the last summary out
            int lines = ds.Lines.Count - linesBefore;
            TestContext.Out.WriteLine($"full disk: {failures} ENOSPC replies, max batch latency {maxLatencyMs} ms, RSS growth {rssGrowth >> 20} MiB, {lines} log lines");
            Assert.That(failures, Is.GreaterThan(100), "the disk really was full");
            Assert.That(maxLatencyMs, Is.LessThan(2000), "errors come back promptly");
            Assert.That(rssGrowth, Is.LessThan(64L << 20));
            Assert.That(lines, Is.LessThanOrEqualTo(36), string.Join("\n", ds.Lines.TakeLast(40)));

            File.Delete(ballast);
            DownstairsResult ok = await c.WriteAsync(++job, 4096, big);
            Assert.That(ok.IsOk, Is.True, ok.ToString());
            Assert.That((await c.FlushAsync(++job, 2, 1)).IsOk, Is.True);
            byte[] back = new byte[4096];
            await c.ReadAsync(++job, 0, back);
            Assert.That(back, Is.EqualTo(block), "data written before the disk filled is intact");
        }
        finally
        {
            await Sh("umount", "-l", mount);
        }
    }

    private static void FillUp(string path)
    {
        byte[] chunk = new byte[1 << 20];
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write);
        for (int i = 0; i < 128; i++)
        {
            try
            {
                f.Write(chunk);
                f.Flush();
            }
            catch (IOException)
            {
                break;
            }
        }
        // Fill the last partial megabyte too.
        for (int i = 0; i < 256; i++)
        {
            try
            {
                f.Write(chunk.AsSpan(0, 4096));
                f.Flush();
            }
            catch (IOException)
            {
                return;
            }
        }
    }

    private static async Task<int> Sh(string file, params string[] args)
    {
        using Process p = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardError = true, RedirectStandardOutput = true })!;
        await p.WaitForExitAsync();
        return p.ExitCode;
    }
}
