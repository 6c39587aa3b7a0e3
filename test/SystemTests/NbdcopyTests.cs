namespace NbdServer.SystemTests;

/// <summary>libnbd's <c>nbdcopy</c>: multi-connection, many requests in flight, large transfers.</summary>
[TestFixture]
[CancelAfter(180_000)]
public sealed class NbdcopyTests
{
    private const string Nbdcopy = "/usr/bin/nbdcopy";

    [Test]
    public async Task Nbdcopy_round_trip_of_256_MiB_preserves_sha256()
    {
        RealClient.Require(Nbdcopy, "libnbd-bin");
        using var scratch = new ScratchDirectory("nbdcopy");
        const long size = 256L << 20;
        string source = scratch.File("source.img");
        string back = scratch.File("back.img");
        string sourceHash = RealClient.WriteRandomFile(source, size, seed: 256);
        using var server = await NbdServerProcess.StartAsync("--memory", "256M");

        // nbdcopy uses 4 connections (the export advertises multi-conn) and 64 requests in flight each.
        ExternalTool.Result upload = await RealClient.RunAsync(Nbdcopy, ["--flush", source, server.Uri()], TimeSpan.FromSeconds(90));
        Assert.That(upload.ExitCode, Is.EqualTo(0), upload.ToString());
        ExternalTool.Result download = await RealClient.RunAsync(Nbdcopy, [server.Uri(), back], TimeSpan.FromSeconds(90));
        Assert.That(download.ExitCode, Is.EqualTo(0), download.ToString());

        Assert.Multiple(() =>
        {
            Assert.That(new FileInfo(back).Length, Is.EqualTo(size));
            Assert.That(RealClient.Sha256(back), Is.EqualTo(sourceHash));
        });
    }

    [Test]
    public async Task Nbdcopy_between_two_servers_copies_a_file_export_exactly()
    {
        RealClient.Require(Nbdcopy, "libnbd-bin");
        using var scratch = new ScratchDirectory("nbdcopy-n2n");
        const long size = 32L << 20;
        string source = scratch.File("source.img");
        string sourceHash = RealClient.WriteRandomFile(source, size, seed: 32);
        using var from = await NbdServerProcess.StartAsync("--file", source, "--read-only");
        using var to = await NbdServerProcess.StartAsync("--file", scratch.File("target.img"), "--size", "32M");

        ExternalTool.Result copy = await RealClient.RunAsync(Nbdcopy, ["--flush", from.Uri(), to.Uri()], TimeSpan.FromSeconds(90));
        Assert.That(copy.ExitCode, Is.EqualTo(0), copy.ToString());
        Assert.That(RealClient.Sha256(scratch.File("target.img")), Is.EqualTo(sourceHash));
    }
}
