using System.IO.Pipelines;
using Nerdbank.Streams;
using NbdServer.Downstairs.Client;
using NbdServer.Downstairs.Protocol;
using NbdServer.Downstairs.Server;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// Attacks on an in-process downstairs, each written as the attack: the honest upstairs keeps being
/// served and nothing on disk changes.
/// </summary>
[CancelAfter(30_000)]
public sealed class HostileInProcessTests
{
    private TempDir _dir = null!;
    private ListLogger _log = null!;
    private RegionHost _host = null!;
    private DownstairsServer _server = null!;

    private string RegionDir => _dir.Sub("r");

    [SetUp]
    public void SetUp()
    {
        _dir = new TempDir();
        _log = new ListLogger();
        Start(new DownstairsOptions { DataDir = "", MaxFrameBytes = 4 << 20, MaxBytesPerConnection = 8 << 20 });
    }

    private void Start(DownstairsOptions options)
    {
        Region region = Directory.Exists(RegionDir) ? Region.Open(RegionDir) : Region.Create(RegionDir, 8 << 20, 4096, 512, preallocate: false);
        _host = new RegionHost(region, options with { DataDir = RegionDir }, _log);
        _server = new DownstairsServer(_host);
    }

    private async Task RestartAsync(DownstairsOptions options)
    {
        await _server.DisposeAsync();
        _host.Dispose();
        Start(options);
    }

    [TearDown]
    public async Task TearDown()
    {
        await _server.DisposeAsync();
        _host.Dispose();
        _dir.Dispose();
    }

    private Stream Connect()
    {
        var options = new PipeOptions(pauseWriterThreshold: 4 << 20, resumeWriterThreshold: 2 << 20);
        (Stream a, Stream b) = FullDuplexStream.CreatePair(options);
        _ = _server.ServeAsync(b);
        return a;
    }

    private static HelloRequest Hello(ulong generation, bool readOnly = false, Guid? upstairs = null) =>
        new(Wire.ProtocolVersion, readOnly, Guid.Empty, upstairs ?? Guid.NewGuid(), Guid.NewGuid(), generation);

    /// <summary>The honest upstairs: connected read-write, one block written and flushed.</summary>
    private async Task<(DownstairsClient Client, byte[] Block)> HonestAsync(ulong generation)
    {
        DownstairsClient c = await DownstairsClient.ConnectAsync(Connect(), Hello(generation));
        byte[] block = TestData.Block(4096, 700, 1);
        Assert.That((await c.WriteAsync(1, 700, block)).IsOk, Is.True);
        Assert.That((await c.FlushAsync(2, 1, generation)).IsOk, Is.True);
        return (c, block);
    }

    private static async Task AssertStillServedAsync(DownstairsClient honest, byte[] block)
    {
        Assert.That(await honest.PingAsync(), Is.LessThan(TimeSpan.FromSeconds(10)));
        byte[] back = new byte[4096];
        Assert.That((await honest.ReadAsync(100, 700, back)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(block));
    }

    private static async Task<ResultCode> RawHelloAsync(Stream s, ulong generation, bool readOnly)
    {
        var peer = new RawPeer(s);
        return await peer.HelloAsync(generation, readOnly);
    }

    [Test]
    public async Task Hello_with_generation_2_pow_64_minus_1_or_beyond_the_step_is_refused_and_not_recorded()
    {
        (DownstairsClient honest, byte[] block) = await HonestAsync(5);
        await using (honest)
        {
            string before = DiskState.Of(RegionDir);
            DownstairsOptions d = _host.Options;
            Assert.That(await RawHelloAsync(Connect(), ulong.MaxValue, readOnly: false), Is.EqualTo(ResultCode.Invalid), "the one-packet brick");
            Assert.That(await RawHelloAsync(Connect(), 5 + d.MaxGenerationStep + 1, readOnly: false), Is.EqualTo(ResultCode.Invalid), "one more than the step");
            Assert.That(_host.Region.HighestGeneration, Is.EqualTo(5UL));
            Assert.That(DiskState.Of(RegionDir), Is.EqualTo(before), "no generation recorded");
            Assert.That(await honest.PingAsync(), Is.LessThan(TimeSpan.FromSeconds(10)));
            Assert.That((await honest.WriteAsync(3, 701, TestData.Block(4096, 701, 1))).IsOk, Is.True, "the honest writer was not fenced");
            await AssertStillServedAsync(honest, block);
        }
        // The largest allowed raise still works (an honest jump, e.g. an explicit --generation).
        Assert.That(await RawHelloAsync(Connect(), 5 + _host.Options.MaxGenerationStep, readOnly: false), Is.EqualTo(ResultCode.Ok));
    }

    [Test]
    public async Task Generation_0_is_never_valid_for_a_writer_even_on_a_fresh_region()
    {
        string before = DiskState.Of(RegionDir);
        Assert.That(await RawHelloAsync(Connect(), 0, readOnly: false), Is.EqualTo(ResultCode.Invalid));
        Assert.That(DiskState.Of(RegionDir), Is.EqualTo(before));
        Assert.That(await RawHelloAsync(Connect(), 0, readOnly: true), Is.EqualTo(ResultCode.Ok), "the read-only probe still works");
    }
}
