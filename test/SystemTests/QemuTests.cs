namespace NbdServer.SystemTests;

/// <summary>QEMU's block layer as the client: <c>qemu-io</c> patterns and <c>qemu-img convert/compare</c>.</summary>
[TestFixture]
[CancelAfter(180_000)]
public sealed class QemuTests
{
    private const string QemuImg = "/usr/bin/qemu-img";

    private static void AssertAllVerified(ExternalTool.Result result)
    {
        Assert.Multiple(() =>
        {
            Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
            Assert.That(result.Output + result.Error, Does.Not.Contain("Pattern verification failed").And.Not.Contain("error"), result.ToString());
        });
    }

    [Test]
    public async Task Qemu_io_pattern_write_then_pattern_read_of_1_MiB_verifies()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        ExternalTool.Result result = await RealClient.QemuIoAsync(server.Uri(),
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0x3c 60M 4M",
            "read -P 0x3c 60M 4M");
        AssertAllVerified(result);
        Assert.That(result.Output, Does.Contain("read 1048576/1048576 bytes at offset 0"));
    }

    [Test]
    public async Task Qemu_io_pattern_read_detects_data_that_differs()
    {
        // The negative control: proves the pattern checks above would catch wrong data.
        using var server = await NbdServerProcess.StartAsync("--memory", "16M");
        ExternalTool.Result result = await RealClient.QemuIoAsync(server.Uri(), "write -P 0xab 0 64k", "read -P 0xee 0 64k");
        Assert.Multiple(() =>
        {
            Assert.That(result.ExitCode, Is.Not.EqualTo(0), result.ToString());
            Assert.That(result.Output + result.Error, Does.Contain("Pattern verification failed"));
        });
    }

    [Test]
    public async Task Qemu_io_unaligned_writes_land_exactly_and_leave_neighbours_untouched()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "16M");
        ExternalTool.Result result = await RealClient.QemuIoAsync(server.Uri(),
            "write -P 0x11 0 4M",
            "write -P 0xcd 1234567 70001",      // odd offset, odd length
            "write -P 0x77 3 5",                // a few bytes near the start
            "read -P 0x11 0 3",
            "read -P 0x77 3 5",
            "read -P 0x11 8 1234559",
            "read -P 0xcd 1234567 70001",
            "read -P 0x11 1304568 100000",
            "read -P 0 4M 1M");                 // never written
        AssertAllVerified(result);
    }

    [Test]
    public async Task Qemu_io_write_zeroes_and_discard_read_back_as_zeros()
    {
        using var scratch = new ScratchDirectory("qemu-io-zero");
        using var server = await NbdServerProcess.StartAsync("--file", scratch.File("disk.img"), "--size", "32M");
        ExternalTool.Result result = await RealClient.QemuIoAsync(server.Uri(),
            "write -P 0xef 0 8M",
            "write -z 1M 1M",                   // WRITE_ZEROES
            "write -z -u 3M 1M",                // WRITE_ZEROES, may unmap
            "write -z 5000 3000",               // unaligned zeroing
            "discard 6M 1M",                    // TRIM
            "read -P 0xef 0 5000",
            "read -P 0 5000 3000",
            "read -P 0xef 8000 1040576",
            "read -P 0 1M 1M",
            "read -P 0xef 2M 1M",
            "read -P 0 3M 1M",
            "read -P 0xef 4M 2M",
            "read -P 0 6M 1M",
            "read -P 0xef 7M 1M",
            "flush");
        AssertAllVerified(result);
    }

    [Test]
    public async Task Qemu_img_convert_of_a_random_file_to_nbd_and_back_is_identical()
    {
        RealClient.Require(QemuImg, "qemu-utils");
        using var scratch = new ScratchDirectory("qemu-img");
        const long size = 64L << 20;
        string source = scratch.File("source.img");
        string back = scratch.File("back.img");
        string sourceHash = RealClient.WriteRandomFile(source, size, seed: 42);
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");

        ExternalTool.Result upload = await RealClient.RunAsync(QemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, server.Uri()], TimeSpan.FromSeconds(90));
        Assert.That(upload.ExitCode, Is.EqualTo(0), upload.ToString());
        ExternalTool.Result compare = await RealClient.RunAsync(QemuImg, ["compare", "-f", "raw", "-F", "raw", source, server.Uri()], TimeSpan.FromSeconds(90));
        Assert.That(compare.ExitCode, Is.EqualTo(0), compare.ToString());
        ExternalTool.Result download = await RealClient.RunAsync(QemuImg, ["convert", "-f", "raw", "-O", "raw", server.Uri(), back], TimeSpan.FromSeconds(90));
        Assert.That(download.ExitCode, Is.EqualTo(0), download.ToString());

        Assert.Multiple(() =>
        {
            Assert.That(compare.Output, Does.Contain("Images are identical"));
            Assert.That(new FileInfo(back).Length, Is.EqualTo(size));
            Assert.That(RealClient.Sha256(back), Is.EqualTo(sourceHash));
        });
    }

    [Test]
    public async Task Qemu_img_convert_of_a_sparse_file_keeps_the_export_sparse()
    {
        RealClient.Require(QemuImg, "qemu-utils");
        using var scratch = new ScratchDirectory("qemu-img-sparse");
        string source = scratch.File("sparse.img");
        using (var file = new FileStream(source, FileMode.CreateNew, FileAccess.Write))
        {
            file.SetLength(32L << 20);
            file.Position = 16L << 20;
            file.Write(Enumerable.Repeat((byte)0x5e, 1 << 20).ToArray());
        }
        using var server = await NbdServerProcess.StartAsync("--memory", "32M");

        ExternalTool.Result upload = await RealClient.RunAsync(QemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, server.Uri()], TimeSpan.FromSeconds(60));
        Assert.That(upload.ExitCode, Is.EqualTo(0), upload.ToString());
        ExternalTool.Result map = await RealClient.RunAsync(QemuImg, ["map", "-f", "raw", "--output=json", server.Uri()], TimeSpan.FromSeconds(60));
        ExternalTool.Result compare = await RealClient.RunAsync(QemuImg, ["compare", "-f", "raw", "-F", "raw", source, server.Uri()], TimeSpan.FromSeconds(60));

        using var json = System.Text.Json.JsonDocument.Parse(map.Output);
        long dataBytes = json.RootElement.EnumerateArray()
            .Where(e => e.GetProperty("data").GetBoolean())
            .Sum(e => e.GetProperty("length").GetInt64());
        Assert.Multiple(() =>
        {
            Assert.That(compare.ExitCode, Is.EqualTo(0), compare.ToString());
            Assert.That(dataBytes, Is.EqualTo(1L << 20), map.Output);
        });
    }

    [Test]
    public async Task Qemu_img_compare_reports_a_difference_after_one_byte_changes()
    {
        RealClient.Require(QemuImg, "qemu-utils");
        using var scratch = new ScratchDirectory("qemu-img-compare");
        string source = scratch.File("source.img");
        RealClient.WriteRandomFile(source, 8L << 20, seed: 7);
        using var server = await NbdServerProcess.StartAsync("--memory", "8M");
        ExternalTool.Result upload = await RealClient.RunAsync(QemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, server.Uri()], TimeSpan.FromSeconds(60));
        Assert.That(upload.ExitCode, Is.EqualTo(0), upload.ToString());

        ExternalTool.Result poke = await RealClient.QemuIoAsync(server.Uri(), "write -P 0x00 5000192 1");
        Assert.That(poke.ExitCode, Is.EqualTo(0), poke.ToString());
        ExternalTool.Result compare = await RealClient.RunAsync(QemuImg, ["compare", "-f", "raw", "-F", "raw", source, server.Uri()], TimeSpan.FromSeconds(60));

        // Exit 1 means "images differ"; qemu-img names the 512-byte sector, so we change a sector-aligned byte, unless the
        // random source already had a zero there (seeded, so the test is deterministic either way).
        byte original = File.ReadAllBytes(source)[5000192];
        Assert.That(compare.ExitCode, Is.EqualTo(original == 0 ? 0 : 1), compare.ToString());
        if (original != 0)
        {
            Assert.That(compare.Output, Does.Contain("Content mismatch at offset 5000192"));
        }
    }
}
