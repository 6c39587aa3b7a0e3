using System.Diagnostics;

namespace NbdServer.SystemTests;

/// <summary>SIGTERM with real clients attached: the server drains, closes and exits 0 promptly.</summary>
[TestFixture]
[CancelAfter(90_000)]
public sealed class ShutdownTests
{
    private static readonly TimeSpan Prompt = TimeSpan.FromSeconds(5);

    [Test]
    public async Task Sigterm_with_an_idle_client_connected_exits_0_promptly()
    {
        await RealClient.RequireNbdshAsync();
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        using Process client = RealClient.Start("/usr/bin/nbdsh", "-u", server.Uri(), "-c", "import time; time.sleep(60)");
        try
        {
            bool attached = await RealClient.WaitUntilAsync(() => server.Log.Contains("attached to export", StringComparison.Ordinal), TimeSpan.FromSeconds(20));
            Assert.That(attached, Is.True, $"nbdsh never attached:\n{server.Log}");

            var clock = Stopwatch.StartNew();
            int exitCode = await server.StopAsync(TimeSpan.FromSeconds(30));
            clock.Stop();

            Assert.Multiple(() =>
            {
                Assert.That(exitCode, Is.EqualTo(0), server.Log);
                Assert.That(clock.Elapsed, Is.LessThan(Prompt), server.Log);
                Assert.That(server.Log, Does.Contain("Shutting down: draining 1 connection(s)"));
            });
        }
        finally
        {
            client.Kill(entireProcessTree: true);
            client.WaitForExit(5000);
        }
    }

    [Test]
    public async Task Sigterm_during_continuous_writes_exits_0_promptly_and_the_client_sees_the_end()
    {
        await RealClient.RequireNbdshAsync();
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        // Writes 1 MiB blocks in a loop until the server stops answering; then reports how it ended.
        const string Script = """
            import sys
            data = b"\x5a" * (1 << 20)
            count = 0
            try:
                while True:
                    h.pwrite(data, (count % 64) << 20)
                    count += 1
                    if count == 20:
                        print("writing", flush=True)
            except nbd.Error as e:
                print("ended with", e.errno, "after", count, "writes", flush=True)
            """;
        Task<ExternalTool.Result> client = RealClient.RunAsync("/usr/bin/nbdsh", ["-u", server.Uri(), "-c", Script], TimeSpan.FromSeconds(60));
        bool busy = await RealClient.WaitUntilAsync(() => server.Log.Contains("attached to export", StringComparison.Ordinal), TimeSpan.FromSeconds(20));
        Assert.That(busy, Is.True, $"nbdsh never attached:\n{server.Log}");
        await Task.Delay(500);   // let writes flow

        var clock = Stopwatch.StartNew();
        int exitCode = await server.StopAsync(TimeSpan.FromSeconds(30));
        clock.Stop();
        // The client must notice: its write fails (ESHUTDOWN or a closed connection) and it ends.
        ExternalTool.Result ended = await client.WaitAsync(TimeSpan.FromSeconds(20));

        Assert.Multiple(() =>
        {
            Assert.That(exitCode, Is.EqualTo(0), server.Log);
            Assert.That(clock.Elapsed, Is.LessThan(Prompt), server.Log);
            Assert.That(ended.Output, Does.Contain("writing").And.Contain("ended with"), ended.ToString());
            Assert.That(server.Log, Does.Not.Contain("unexpected failure"));
        });
    }

    [Test]
    public async Task Sigterm_with_no_clients_exits_0_promptly()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        var clock = Stopwatch.StartNew();
        int exitCode = await server.StopAsync(TimeSpan.FromSeconds(30));
        Assert.Multiple(() =>
        {
            Assert.That(exitCode, Is.EqualTo(0), server.Log);
            Assert.That(clock.Elapsed, Is.LessThan(Prompt), server.Log);
        });
    }
}
