using System.Text.Json;

namespace NbdServer.SystemTests;

/// <summary>
/// <c>systemctl reload nbd-server</c> (SIGHUP) under a real client's IO: the process execs a new
/// image of itself, which takes over every connection between two requests. fio (libnbd) must see
/// neither an error nor a reconnect, every block it wrote must verify, and the replicas must end identical.
/// </summary>
[TestFixture]
[Category("Replicated")]
[NonParallelizable]
[CancelAfter(240_000)]
public sealed class ReloadTests
{
    private const string Fio = "/usr/bin/fio";

    [Test]
    public async Task Two_reloads_under_fio_on_two_connections_cost_no_error_and_every_block_verifies(CancellationToken cancellationToken)
    {
        RealClient.Require(Fio, "fio");
        using var volume = await ReplicatedVolumeFixture.StartAsync("reload", 64L << 20);
        NbdServerProcess upstairs = volume.Upstairs!;
        int pid = upstairs.ProcessId;
        string job = Path.Combine(volume.Scratch, "reload.fio");
        // Two jobs, two connections; each writes its own part and then reads all of it back, twice
        // over. The rate keeps fio running for about 12 s however fast the machine is, so both
        // reloads land mid-job (an unpaced job ended before the second reload on a fast CI machine).
        await File.WriteAllTextAsync(job, $"""
            [global]
            ioengine=nbd
            uri={volume.Uri}
            rw=randwrite
            bs=4k
            iodepth=16
            size=24M
            loops=2
            rate_iops=2000
            verify=crc32c
            verify_fatal=1
            verify_dump=0

            [low]
            offset=0

            [high]
            offset=32M
            """, cancellationToken);

        Task<ExternalTool.Result> fio = RealClient.RunAsync(Fio, ["--output-format=json", job], TimeSpan.FromSeconds(200));
        for (int reload = 1; reload <= 2; reload++)
        {
            await Task.Delay(TimeSpan.FromSeconds(1.5), cancellationToken);
            Assert.That(fio.IsCompleted, Is.False, $"fio ended before reload {reload}");
            var clock = System.Diagnostics.Stopwatch.StartNew();
            await volume.ReloadUpstairsAsync();
            // Printed, not asserted: from SIGHUP to the new image serving the clients again.
            TestContext.Out.WriteLine($"reload {reload}: the new image took over after {clock.Elapsed.TotalSeconds:0.00} s");
        }
        ExternalTool.Result result = await fio;

        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Error, Does.Not.Contain("verify:").And.Not.Contain("bad magic"), result.Error);
        string output = result.Output[result.Output.IndexOf('{', StringComparison.Ordinal)..];
        using JsonDocument json = JsonDocument.Parse(output);
        foreach (JsonElement j in json.RootElement.GetProperty("jobs").EnumerateArray())
        {
            Assert.That(j.GetProperty("error").GetInt32(), Is.EqualTo(0), j.GetProperty("jobname").GetString());
            Assert.That(j.GetProperty("read").GetProperty("io_bytes").GetInt64(), Is.EqualTo(2 * (24L << 20)), "every block written was read back");
        }
        Assert.Multiple(() =>
        {
            Assert.That(upstairs.ProcessId, Is.EqualTo(pid));
            Assert.That(upstairs.HasExited, Is.False);
            Assert.That(upstairs.Reloads, Is.EqualTo(2));
            // Both fio connections were live at each reload, and went over.
            Assert.That(System.Text.RegularExpressions.Regex.Count(upstairs.Log, @"Took over from the previous image: 2 session\(s\)"), Is.EqualTo(2), upstairs.Log);
            Assert.That(upstairs.Log, Does.Not.Contain("ESHUTDOWN").And.Not.Contain("cannot be read"));
        });

        VolumeStatus status = await volume.WaitForStatusAsync(s => s.AllActive, TimeSpan.FromSeconds(30), "all three replicas active after the reloads");
        Assert.That(status.InService, Is.EqualTo(3), status.Json);
        await volume.StopAllAsync();
        ExternalTool.Result compare = await volume.CompareAsync();
        Assert.That(compare.Output, Does.Contain("IDENTICAL"), compare.ToString());
    }

    [TestCase(false, TestName = "A_burst_of_sighups_while_new_images_start_neither_ends_the_server_nor_fails_the_client_on_TCP")]
    [TestCase(true, TestName = "A_burst_of_sighups_while_new_images_start_neither_ends_the_server_nor_fails_the_client_on_the_Unix_socket")]
    public async Task A_burst_of_sighups_while_new_images_start_neither_ends_the_server_nor_fails_the_client(bool unix, CancellationToken cancellationToken)
    {
        RealClient.Require(Fio, "fio");
        using var scratch = new ScratchDirectory("reload-burst");
        string socket = scratch.File("nbd.sock");
        using var server = await NbdServerProcess.StartAsync(["--file", scratch.File("disk.img"), "--size", "64M", .. unix ? new[] { "--unix", socket } : []]);
        string uri = unix ? $"nbd+unix:///vol0?socket={socket}" : server.Uri();
        int pid = server.ProcessId;
        string job = scratch.File("burst.fio");
        await File.WriteAllTextAsync(job, $"""
            [global]
            ioengine=nbd
            uri={server.Uri()}
            rw=randwrite
            bs=4k
            iodepth=16
            size=16M
            loops=2
            rate_iops=2000
            verify=crc32c
            verify_fatal=1
            verify_dump=0

            [burst]
            """.Replace(server.Uri(), uri, StringComparison.Ordinal), cancellationToken);

        Task<ExternalTool.Result> fio = RealClient.RunAsync(Fio, [job], TimeSpan.FromSeconds(120));
        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
        Assert.That(fio.IsCompleted, Is.False, "fio ended before the signals");
        // Ten signals 100 ms apart: most land while a new image is still starting, before .NET
        // could have installed a handler, where SIGHUP's default action would end the process.
        for (int i = 0; i < 10; i++)
        {
            using (var kill = System.Diagnostics.Process.Start("kill", ["-HUP", pid.ToString(System.Globalization.CultureInfo.InvariantCulture)]))
            {
                await kill.WaitForExitAsync(cancellationToken);
            }
            await Task.Delay(100, cancellationToken);
        }
        ExternalTool.Result result = await fio;

        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(server.HasExited, Is.False, server.Log);
        Assert.That(server.ProcessId, Is.EqualTo(pid));
        Assert.That(server.Reloads, Is.GreaterThanOrEqualTo(1), server.Log);
    }

    [Test]
    public async Task A_config_file_edited_into_a_bad_setting_refuses_the_reload_and_the_running_image_keeps_serving(CancellationToken cancellationToken)
    {
        RealClient.Require("/usr/bin/nbdinfo", "nbdinfo");
        using var scratch = new ScratchDirectory("reload-config");
        string config = scratch.File("nbd-server.json");
        await File.WriteAllTextAsync(config, """{"description": "first"}""", cancellationToken);
        using var server = await NbdServerProcess.StartAsync("--config", config, "--file", scratch.File("disk.img"), "--size", "16M");

        await File.WriteAllTextAsync(config, """{"description": "second", "max-connections": "many"}""", cancellationToken);
        using (var kill = System.Diagnostics.Process.Start("kill", ["-HUP", server.ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture)]))
        {
            await kill.WaitForExitAsync(cancellationToken);
        }
        for (int i = 0; i < 100 && !server.Log.Contains("Reload refused", StringComparison.Ordinal); i++)
        {
            await Task.Delay(50, cancellationToken);
        }
        Assert.That(server.Log, Does.Contain("Reload refused: the settings the new image would start with are refused").And.Contain("max-connections"));
        Assert.That(server.Reloads, Is.Zero);
        ExternalTool.Result info = await RealClient.RunAsync("/usr/bin/nbdinfo", ["--json", server.Uri()], TimeSpan.FromSeconds(20));
        Assert.That(info.ExitCode, Is.EqualTo(0), "the running image still serves");
        Assert.That(info.Output, Does.Contain("\"first\""));

        await File.WriteAllTextAsync(config, """{"description": "second"}""", cancellationToken);
        await server.ReloadAsync(TimeSpan.FromSeconds(30));
        info = await RealClient.RunAsync("/usr/bin/nbdinfo", ["--json", server.Uri()], TimeSpan.FromSeconds(20));
        Assert.That(info.Output, Does.Contain("\"second\""), "the new image read the config file as it is now");
    }

    [Test]
    public async Task A_new_image_that_cannot_start_refuses_the_reload_and_the_running_image_keeps_serving(CancellationToken cancellationToken)
    {
        RealClient.Require("/usr/bin/nbdinfo", "nbdinfo");
        using var scratch = new ScratchDirectory("reload-broken");
        // The server runs from a copy of its build, which the test then breaks as a bad upgrade would.
        string image = scratch.File("image");
        Directory.CreateDirectory(image);
        foreach (string file in Directory.EnumerateFiles(AppContext.BaseDirectory))
        {
            File.Copy(file, Path.Combine(image, Path.GetFileName(file)));
        }
        string dll = Path.Combine(image, "nbd-server.dll");
        using var server = await NbdServerProcess.StartImageAsync(dll, "--file", scratch.File("disk.img"), "--size", "16M");
        byte[] good = await File.ReadAllBytesAsync(dll, cancellationToken);

        // Replaced, not rewritten: the running image keeps its mapping of the old file.
        File.Delete(dll);
        await File.WriteAllBytesAsync(dll, new byte[4096], cancellationToken);
        Signal(server.ProcessId, "HUP");
        for (int i = 0; i < 400 && !server.Log.Contains("Reload refused", StringComparison.Ordinal); i++)
        {
            await Task.Delay(50, cancellationToken);
        }
        Assert.That(server.Log, Does.Contain("Reload refused: the new image's trial start failed (exit code"), server.Log);
        Assert.That(server.Reloads, Is.Zero);
        Assert.That(server.HasExited, Is.False);
        ExternalTool.Result info = await RealClient.RunAsync("/usr/bin/nbdinfo", ["--json", server.Uri()], TimeSpan.FromSeconds(20));
        Assert.That(info.ExitCode, Is.EqualTo(0), "the running image still serves: " + info);

        // Mended, the same reload goes through.
        File.Delete(dll);
        await File.WriteAllBytesAsync(dll, good, cancellationToken);
        await server.ReloadAsync(TimeSpan.FromSeconds(30));
        Assert.That(server.Reloads, Is.EqualTo(1));
    }

    [Test]
    public async Task A_sighup_while_sigterm_drains_is_refused_and_the_server_exits(CancellationToken cancellationToken)
    {
        using var scratch = new ScratchDirectory("reload-stop");
        using var server = await NbdServerProcess.StartAsync("--file", scratch.File("disk.img"), "--size", "16M");
        // A client stalled half-way through a write keeps the drain going (up to the shutdown timeout).
        using var client = new System.Net.Sockets.Socket(System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
        await client.ConnectAsync(System.Net.IPAddress.Loopback, server.Port, cancellationToken);
        byte[] greeting = new byte[18];
        await client.ReceiveAsync(greeting.AsMemory(), cancellationToken);
        byte[] hello = new byte[4 + 16 + 4];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(hello, 3); // FIXED_NEWSTYLE | NO_ZEROES
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(hello.AsSpan(4), Nbd.NbdMagic.Option);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(hello.AsSpan(12), 1); // NBD_OPT_EXPORT_NAME
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(hello.AsSpan(16), 4);
        "vol0"u8.CopyTo(hello.AsSpan(20));
        await client.SendAsync(hello, cancellationToken);
        byte[] export = new byte[10];
        await client.ReceiveAsync(export.AsMemory(), cancellationToken);
        byte[] write = new byte[Nbd.NbdRequest.Size + 100];
        new Nbd.NbdRequest(Nbd.NbdMagic.Request, Nbd.CommandFlags.None, Nbd.NbdCommand.Write, 1, 0, 65536).Write(write);
        await client.SendAsync(write, cancellationToken);
        await Task.Delay(300, cancellationToken);

        Signal(server.ProcessId, "TERM");
        await Task.Delay(300, cancellationToken);
        Signal(server.ProcessId, "HUP");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!server.HasExited && clock.Elapsed < TimeSpan.FromSeconds(40))
        {
            await Task.Delay(100, cancellationToken);
        }

        Assert.That(server.HasExited, Is.True, $"SIGTERM must end the server, SIGHUP or not:\n{server.Log}");
        Assert.That(server.Log, Does.Contain("reload (SIGHUP) refused: the server is stopping"));
        Assert.That(server.Reloads, Is.Zero);
    }

    private static void Signal(int pid, string signal)
    {
        using var kill = System.Diagnostics.Process.Start("kill", [$"-{signal}", pid.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        kill.WaitForExit(5_000);
    }
}
