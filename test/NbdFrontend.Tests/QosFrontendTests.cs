using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;
using NbdServer.Frontend.Qos;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// QoS seen by a client: a limited export answers every request, later, and never with an error;
/// the limit is the export's across its connections, and never holds up another export.
/// </summary>
[CancelAfter(20_000)]
public sealed class QosFrontendTests
{
    private readonly FakeTimeProvider _time = new();

    private NbdExport Limited(string name, QosLimits limits) =>
        new(name, new MemoryVolume(16L << 20)) { Qos = new QosLimiter(limits, _time) };

    /// <summary>Waits (in real time, briefly) until <paramref name="count"/> connections wait for the export's buckets.</summary>
    private static async Task WhenWaitingAsync(QosLimiter qos, int count)
    {
        while (qos.Waiting != count)
        {
            await Task.Delay(1);
        }
    }

    [Test]
    public async Task A_limited_export_answers_every_request_later_and_without_an_error()
    {
        // 10 reads a second and a bucket of one: each read after the first waits 100 ms.
        NbdExport export = Limited("vol0", new QosLimits { ReadIops = 10, Burst = TimeSpan.FromMilliseconds(100) });
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        for (ulong cookie = 1; cookie <= 5; cookie++)
        {
            await client.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie);
        }

        var replies = new List<(NbdError Error, ulong Cookie)>();
        (NbdError error, ulong first, _) = await client.ReadSimpleReplyAsync(4096);
        replies.Add((error, first));
        for (int i = 1; i < 5; i++)
        {
            await WhenWaitingAsync(export.Qos, 1);
            Task<(NbdError Error, ulong Cookie, byte[] Data)> next = client.ReadSimpleReplyAsync(4096);
            Assert.That(next.IsCompleted, Is.False, $"read {i + 1} was answered before its time");
            _time.Advance(TimeSpan.FromMilliseconds(100));
            (NbdError e, ulong cookie, _) = await next;
            replies.Add((e, cookie));
        }

        Assert.That(replies, Is.EqualTo(Enumerable.Range(1, 5).Select(c => (NbdError.None, (ulong)c))));
        Assert.That(export.Qos.ThrottledRequests, Is.EqualTo(4));
        Assert.That(export.Qos.ThrottledSeconds, Is.EqualTo(0.4).Within(1e-6), "each waited 100 ms of the fake clock");
    }

    [Test]
    public async Task A_write_larger_than_the_burst_goes_at_once_and_the_next_write_pays_for_it()
    {
        // A 1 MiB bucket, a 4 MiB write: it must not wait for a bucket that can never hold it.
        NbdExport export = Limited("vol0", new QosLimits { WriteMbps = 1, Burst = TimeSpan.FromSeconds(1) });
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();

        await client.SendRequestAsync(NbdCommand.Write, 0, 4 << 20, 1, payload: new byte[4 << 20]);
        (NbdError big, _, _) = await client.ReadSimpleReplyAsync();
        await client.SendRequestAsync(NbdCommand.Write, 0, 4096, 2, payload: new byte[4096]);
        await WhenWaitingAsync(export.Qos, 1);
        _time.Advance(TimeSpan.FromSeconds(2.9));
        Task<(NbdError Error, ulong Cookie, byte[] Data)> next = client.ReadSimpleReplyAsync();
        await Task.Delay(50);
        bool early = next.IsCompleted;
        _time.Advance(TimeSpan.FromSeconds(0.2));
        (NbdError small, ulong cookie, _) = await next;

        Assert.That(big, Is.EqualTo(NbdError.None));
        Assert.That(early, Is.False, "the next write waits until the 3 MiB borrowed are repaid");
        Assert.That((small, cookie), Is.EqualTo((NbdError.None, 2UL)));
    }

    [Test]
    public async Task Connections_to_one_export_share_its_limit()
    {
        NbdExport export = Limited("vol0", new QosLimits { TotalIops = 10, Burst = TimeSpan.FromMilliseconds(100) });
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient first = server.Connect();
        await using NbdTestClient second = server.Connect();
        await first.ConnectAsync();
        await second.ConnectAsync();

        await first.SendRequestAsync(NbdCommand.Read, 0, 4096, 1);
        await first.ReadSimpleReplyAsync(4096);
        await second.SendRequestAsync(NbdCommand.Write, 0, 4096, 2, payload: new byte[4096]);
        await WhenWaitingAsync(export.Qos, 1);
        _time.Advance(TimeSpan.FromMilliseconds(100));

        Assert.That((await second.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        Assert.That(export.Qos.ThrottledRequests, Is.EqualTo(1));
    }

    [Test]
    public async Task A_throttled_export_does_not_hold_up_another_export()
    {
        NbdExport slow = Limited("slow", new QosLimits { ReadIops = 1, Burst = TimeSpan.FromSeconds(1) });
        var fast = new NbdExport("fast", new MemoryVolume(16L << 20));
        await using var server = new TestServer(null, null, _time, slow, fast);
        await using NbdTestClient throttled = server.Connect();
        await using NbdTestClient other = server.Connect();
        await throttled.ConnectAsync("slow");
        await other.ConnectAsync("fast");

        await throttled.SendRequestAsync(NbdCommand.Read, 0, 4096, 1);
        await throttled.ReadSimpleReplyAsync(4096);
        await throttled.SendRequestAsync(NbdCommand.Read, 0, 4096, 2);
        await WhenWaitingAsync(slow.Qos, 1);
        for (ulong cookie = 1; cookie <= 20; cookie++)
        {
            await other.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie);
            Assert.That((await other.ReadSimpleReplyAsync(4096)).Error, Is.EqualTo(NbdError.None));
        }

        Assert.That(slow.Qos.Waiting, Is.EqualTo(1), "the slow export's read is still waiting, on the fake clock");
    }

    [Test]
    public async Task Removing_the_limit_frees_a_waiting_request_at_once()
    {
        NbdExport export = Limited("vol0", new QosLimits { ReadIops = 1, Burst = TimeSpan.FromSeconds(1) });
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Read, 0, 4096, 1);
        await client.ReadSimpleReplyAsync(4096);
        await client.SendRequestAsync(NbdCommand.Read, 0, 4096, 2);
        await WhenWaitingAsync(export.Qos, 1);

        export.Qos.Set(QosLimits.Unlimited);
        (NbdError error, ulong cookie, _) = await client.ReadSimpleReplyAsync(4096);

        Assert.That((error, cookie), Is.EqualTo((NbdError.None, 2UL)));
    }

    [TestCase(true, 0, TestName = "Write_zeroes_on_a_volume_that_zeroes_without_writing_counts_no_bytes")]
    [TestCase(false, 1, TestName = "Write_zeroes_on_a_volume_that_writes_the_zeroes_counts_its_length")]
    public async Task Write_zeroes_counts_its_length_only_where_the_volume_writes_the_zeroes(bool fastZero, int throttled)
    {
        VolumeFeatures features = new MemoryVolume(16L << 20).Features;
        var volume = new ScriptedVolume(16L << 20, fastZero ? features : features & ~VolumeFeatures.FastZero);
        var export = new NbdExport("vol0", volume) { Qos = new QosLimiter(new QosLimits { WriteMbps = 1 }, _time) };
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();

        await client.SendRequestAsync(NbdCommand.WriteZeroes, 0, 8 << 20, 1);
        (NbdError zeroes, _, _) = await client.ReadSimpleReplyAsync();
        await client.SendRequestAsync(NbdCommand.Write, 0, 4096, 2, payload: new byte[4096]);
        if (throttled > 0)
        {
            await WhenWaitingAsync(export.Qos, 1);
            _time.Advance(TimeSpan.FromSeconds(8));
        }
        (NbdError write, _, _) = await client.ReadSimpleReplyAsync();

        Assert.That((zeroes, write), Is.EqualTo((NbdError.None, NbdError.None)));
        Assert.That(export.Qos.ThrottledRequests, Is.EqualTo(throttled));
    }

    [Test]
    public async Task Trim_counts_as_a_write_operation_and_no_bytes()
    {
        NbdExport export = Limited("vol0", new QosLimits { WriteIops = 1, WriteMbps = 1 });
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();

        await client.SendRequestAsync(NbdCommand.Trim, 0, 16 << 20, 1);
        (NbdError trim, _, _) = await client.ReadSimpleReplyAsync();
        await client.SendRequestAsync(NbdCommand.Trim, 0, 4096, 2);
        await WhenWaitingAsync(export.Qos, 1);
        _time.Advance(TimeSpan.FromSeconds(1));
        (NbdError second, _, _) = await client.ReadSimpleReplyAsync();

        Assert.That((trim, second), Is.EqualTo((NbdError.None, NbdError.None)));
        Assert.That(export.Qos.ThrottledSeconds, Is.EqualTo(1).Within(0.01), "one operation a second; the 16 MiB range was not charged to the 1 MiB/s bucket");
    }

    [Test]
    public async Task A_shutdown_answers_a_request_waiting_for_its_tokens_instead_of_dropping_it()
    {
        NbdExport export = Limited("vol0", new QosLimits { ReadIops = 1, Burst = TimeSpan.FromSeconds(1) });
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Read, 0, 4096, 1);
        await client.ReadSimpleReplyAsync(4096);
        await client.SendRequestAsync(NbdCommand.Read, 0, 4096, 2);
        await WhenWaitingAsync(export.Qos, 1);

        Task stopping = server.Listener.StopAsync();
        (NbdError error, ulong cookie, _) = await client.ReadSimpleReplyAsync(4096);
        await client.SendRequestAsync(NbdCommand.Disconnect, 0, 0, 3);
        await stopping;

        Assert.That((error, cookie), Is.EqualTo((NbdError.None, 2UL)), "read and validated before the shutdown: answered, not refused or dropped");
    }

    [Test]
    public async Task Flush_is_not_limited()
    {
        NbdExport export = Limited("vol0", new QosLimits { TotalIops = 1, Burst = TimeSpan.FromSeconds(1) });
        await using var server = new TestServer(null, null, _time, export);
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        await client.SendRequestAsync(NbdCommand.Write, 0, 4096, 1, payload: new byte[4096]);
        await client.ReadSimpleReplyAsync();

        for (ulong cookie = 2; cookie < 10; cookie++)
        {
            await client.SendRequestAsync(NbdCommand.Flush, 0, 0, cookie);
            Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        }
        Assert.That(export.Qos.ThrottledRequests, Is.Zero);
    }
}
