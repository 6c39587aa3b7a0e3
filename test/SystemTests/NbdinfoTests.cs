using System.Text.Json;

namespace NbdServer.SystemTests;

/// <summary>libnbd's <c>nbdinfo</c> against the real server: advertised flags, listing, extents, sizes.</summary>
[TestFixture]
[CancelAfter(120_000)]
public sealed class NbdinfoTests
{
    private const string Nbdinfo = "/usr/bin/nbdinfo";

    /// <summary>nbdinfo --can / --is: exit 0 means true, 2 means false.</summary>
    private const int True = 0;
    private const int False = 2;

    private static async Task<ExternalTool.Result> NbdinfoAsync(params string[] args)
    {
        RealClient.Require(Nbdinfo, "libnbd-bin");
        return await RealClient.RunAsync(Nbdinfo, args, TimeSpan.FromSeconds(30));
    }

    [TestCase("flush")]
    [TestCase("fua")]
    [TestCase("trim")]
    [TestCase("zero")]
    [TestCase("fast-zero")]
    [TestCase("df")]
    [TestCase("multi-conn")]
    [TestCase("cache")]
    [TestCase("structured-reply")]
    [TestCase("write")]
    [TestCase("read")]
    [TestCase("connect")]
    public async Task Can_flag_is_advertised_by_a_writable_memory_export(string flag)
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        ExternalTool.Result result = await NbdinfoAsync("--can", flag, server.Uri());
        Assert.That(result.ExitCode, Is.EqualTo(True), $"nbdinfo --can {flag}\n{result}");
    }

    [TestCase("write")]
    [TestCase("trim")]
    [TestCase("zero")]
    [TestCase("fast-zero")]
    public async Task Can_flag_is_not_advertised_by_a_read_only_export(string flag)
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--read-only");
        ExternalTool.Result result = await NbdinfoAsync("--can", flag, server.Uri());
        Assert.That(result.ExitCode, Is.EqualTo(False), $"nbdinfo --can {flag} on a read-only export\n{result}");
    }

    [TestCase("flush")]
    [TestCase("df")]
    [TestCase("multi-conn")]
    [TestCase("cache")]
    [TestCase("structured-reply")]
    public async Task Can_flag_unrelated_to_writing_is_still_advertised_by_a_read_only_export(string flag)
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--read-only");
        ExternalTool.Result result = await NbdinfoAsync("--can", flag, server.Uri());
        Assert.That(result.ExitCode, Is.EqualTo(True), $"nbdinfo --can {flag} on a read-only export\n{result}");
    }

    [Test]
    public async Task Is_read_only_is_true_only_for_a_read_only_server()
    {
        using var readOnly = await NbdServerProcess.StartAsync("--memory", "64M", "--read-only");
        using var writable = await NbdServerProcess.StartAsync("--memory", "64M");

        ExternalTool.Result onReadOnly = await NbdinfoAsync("--is", "read-only", readOnly.Uri());
        ExternalTool.Result onWritable = await NbdinfoAsync("--is", "read-only", writable.Uri());

        Assert.Multiple(() =>
        {
            Assert.That(onReadOnly.ExitCode, Is.EqualTo(True), onReadOnly.ToString());
            Assert.That(onWritable.ExitCode, Is.EqualTo(False), onWritable.ToString());
        });
    }

    [Test]
    public async Task Is_rotational_is_false()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        ExternalTool.Result result = await NbdinfoAsync("--is", "rotational", server.Uri());
        Assert.That(result.ExitCode, Is.EqualTo(False), result.ToString());
    }

    [Test]
    public async Task List_shows_the_export_with_its_name_description_and_size()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "48M", "--export", "disk7", "--description", "system test disk");
        ExternalTool.Result result = await NbdinfoAsync("--list", "--json", $"nbd://127.0.0.1:{server.Port}");
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());

        using JsonDocument json = JsonDocument.Parse(result.Output);
        JsonElement[] exports = [.. json.RootElement.GetProperty("exports").EnumerateArray()];
        JsonElement[] named = [.. exports.Where(e => e.GetProperty("export-name").GetString() == "disk7")];
        Assert.That(named, Has.Length.EqualTo(1), result.Output);
        Assert.Multiple(() =>
        {
            Assert.That(named[0].GetProperty("description").GetString(), Is.EqualTo("system test disk"));
            Assert.That(named[0].GetProperty("export-size").GetInt64(), Is.EqualTo(48L << 20));
        });
    }

    [Test]
    public async Task List_in_text_form_names_the_export()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "16M", "--export", "listed");
        ExternalTool.Result result = await NbdinfoAsync("--list", $"nbd://127.0.0.1:{server.Port}");
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Output, Does.Contain("export=\"listed\""));
    }

    [Test]
    public async Task Json_reports_the_exact_size_of_a_memory_export()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "256M");
        ExternalTool.Result result = await NbdinfoAsync("--json", server.Uri());
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());

        using JsonDocument json = JsonDocument.Parse(result.Output);
        JsonElement export = json.RootElement.GetProperty("exports")[0];
        Assert.Multiple(() =>
        {
            Assert.That(export.GetProperty("export-size").GetInt64(), Is.EqualTo(256L << 20));
            Assert.That(export.GetProperty("is_read_only").GetBoolean(), Is.False);
            Assert.That(json.RootElement.GetProperty("structured").GetBoolean(), Is.True);
        });
    }

    [Test]
    public async Task Json_reports_the_size_of_a_file_export_created_with_an_odd_size()
    {
        using var scratch = new ScratchDirectory("nbdinfo");
        // Not a multiple of 4 KiB or even 512: the export size must be exactly the file size.
        const long size = (3L << 20) + 1234;
        using var server = await NbdServerProcess.StartAsync("--file", scratch.File("disk.img"), "--size", RealClient.Invariant(size));
        ExternalTool.Result json = await NbdinfoAsync("--json", server.Uri());
        ExternalTool.Result plain = await NbdinfoAsync("--size", server.Uri());

        using JsonDocument document = JsonDocument.Parse(json.Output);
        Assert.Multiple(() =>
        {
            Assert.That(document.RootElement.GetProperty("exports")[0].GetProperty("export-size").GetInt64(), Is.EqualTo(size), json.ToString());
            Assert.That(plain.Output.Trim(), Is.EqualTo(RealClient.Invariant(size)), plain.ToString());
            Assert.That(new FileInfo(scratch.File("disk.img")).Length, Is.EqualTo(size));
        });
    }

    [Test]
    public async Task Empty_export_name_reaches_the_default_export()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "32M");
        ExternalTool.Result result = await NbdinfoAsync("--size", $"nbd://127.0.0.1:{server.Port}");
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Output.Trim(), Is.EqualTo(RealClient.Invariant(32L << 20)));
    }

    [Test]
    public async Task Unknown_export_name_is_refused()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "32M");
        ExternalTool.Result result = await NbdinfoAsync("--size", server.Uri("no-such-export"));
        Assert.That(result.ExitCode, Is.Not.EqualTo(0), result.ToString());
    }

    [Test]
    public async Task Map_of_a_fresh_memory_export_is_one_hole_zero_extent()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        IReadOnlyList<Extent> map = await MapAsync(server.Uri());
        Assert.That(map, Is.EqualTo(new[] { new Extent(0, 64L << 20, 3, "hole,zero") }));
    }

    [Test]
    public async Task Map_after_writing_shows_data_between_hole_zero_extents()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        // 1 MiB of data at 4 MiB and 64 KiB at 32 MiB, written by a different client (qemu-io).
        RealClient.Require("/usr/bin/qemu-io", "qemu-utils");
        ExternalTool.Result write = await RealClient.RunAsync("/usr/bin/qemu-io",
            ["-f", "raw", server.Uri(), "-c", "write -P 0x5a 4M 1M", "-c", "write -P 0x11 32M 64k"]);
        Assert.That(write.ExitCode, Is.EqualTo(0), write.ToString());

        IReadOnlyList<Extent> map = await MapAsync(server.Uri());
        Assert.That(map, Is.EqualTo(new[]
        {
            new Extent(0, 4L << 20, 3, "hole,zero"),
            new Extent(4L << 20, 1L << 20, 0, "data"),
            new Extent(5L << 20, 27L << 20, 3, "hole,zero"),
            new Extent(32L << 20, 64L << 10, 0, "data"),
            new Extent((32L << 20) + (64L << 10), (32L << 20) - (64L << 10), 3, "hole,zero"),
        }));
    }

    [Test]
    public async Task Map_totals_count_written_bytes_as_data()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "64M");
        RealClient.Require("/usr/bin/qemu-io", "qemu-utils");
        ExternalTool.Result write = await RealClient.RunAsync("/usr/bin/qemu-io", ["-f", "raw", server.Uri(), "-c", "write -P 0x77 8M 8M"]);
        Assert.That(write.ExitCode, Is.EqualTo(0), write.ToString());

        ExternalTool.Result totals = await NbdinfoAsync("--map", "--totals", "--json", server.Uri());
        Assert.That(totals.ExitCode, Is.EqualTo(0), totals.ToString());
        using JsonDocument json = JsonDocument.Parse(totals.Output);
        long data = json.RootElement.EnumerateArray().Where(e => e.GetProperty("type").GetInt32() == 0).Sum(e => e.GetProperty("size").GetInt64());
        Assert.That(data, Is.EqualTo(8L << 20), totals.Output);
    }

    private sealed record Extent(long Offset, long Length, int Type, string Description);

    private static async Task<IReadOnlyList<Extent>> MapAsync(string uri)
    {
        ExternalTool.Result result = await NbdinfoAsync("--map", "--json", uri);
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        using JsonDocument json = JsonDocument.Parse(result.Output);
        return [.. json.RootElement.EnumerateArray().Select(e => new Extent(
            e.GetProperty("offset").GetInt64(),
            e.GetProperty("length").GetInt64(),
            e.GetProperty("type").GetInt32(),
            e.GetProperty("description").GetString() ?? ""))];
    }
}
