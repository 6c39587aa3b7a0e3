using System.Text.Json;

namespace NbdServer.SystemTests;

/// <summary>fio's own NBD engine (libnbd underneath): random writes at queue depth 32, then crc32c verify.</summary>
[TestFixture]
[CancelAfter(180_000)]
public sealed class FioTests
{
    private const string Fio = "/usr/bin/fio";

    [Test]
    public async Task Fio_nbd_engine_random_writes_at_iodepth_32_verify_with_crc32c()
    {
        RealClient.Require(Fio, "fio");
        using var scratch = new ScratchDirectory("fio");
        using var server = await NbdServerProcess.StartAsync("--memory", "128M");
        string job = scratch.File("verify.fio");
        await File.WriteAllTextAsync(job, $"""
            [global]
            ioengine=nbd
            uri={server.Uri()}
            rw=randwrite
            iodepth=32
            size=64M
            verify=crc32c
            do_verify=1
            verify_fatal=1
            verify_dump=0

            [small-blocks]
            bs=4k
            offset=0

            [large-blocks]
            bs=1M
            offset=64M
            """);

        ExternalTool.Result result = await RealClient.RunAsync(Fio, ["--output-format=json", job], TimeSpan.FromSeconds(150));
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Error, Does.Not.Contain("verify:").And.Not.Contain("bad magic").And.Not.Contain("crc32c"), result.Error);

        // fio prints a line or two ("connected to NBD server") before the JSON on stdout.
        string output = result.Output[result.Output.IndexOf('{', StringComparison.Ordinal)..];
        using JsonDocument json = JsonDocument.Parse(output);
        JsonElement[] jobs = [.. json.RootElement.GetProperty("jobs").EnumerateArray()];
        Assert.That(jobs, Has.Length.EqualTo(2));
        foreach (JsonElement job1 in jobs)
        {
            string name = job1.GetProperty("jobname").GetString() ?? "";
            Assert.Multiple(() =>
            {
                Assert.That(job1.GetProperty("error").GetInt32(), Is.EqualTo(0), name);
                // Every byte written was read back and checked.
                Assert.That(job1.GetProperty("write").GetProperty("io_bytes").GetInt64(), Is.EqualTo(64L << 20), name);
                Assert.That(job1.GetProperty("read").GetProperty("io_bytes").GetInt64(), Is.EqualTo(64L << 20), name);
            });
        }
    }
}
