using NbdServer.Nbd;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// A local client that tries to hold the server's memory or its byte budget: bad requests it never
/// reads the answers to, replies it never reads, a write payload it never finishes. Each attack ends
/// with the attacker bounded or closed, its budget back, and another client served.
/// </summary>
[CancelAfter(30_000)]
public sealed class BudgetAttackTests
{
    /// <summary>Budgets small enough that one 64 KiB request holds the whole server's budget.</summary>
    private static readonly FrontendOptions OneRequestBudget = new()
    {
        MaxPayloadBytes = 64 * 1024,
        MaxInFlightBytesPerConnection = 64 * 1024,
        MaxInFlightBytesTotal = 64 * 1024,
        PayloadTimeout = TimeSpan.FromSeconds(1),
        SendTimeout = TimeSpan.FromSeconds(1),
        LogThrottleInterval = TimeSpan.FromSeconds(60),
    };

    [Test]
    public async Task Bad_requests_whose_replies_are_never_read_stop_being_read_and_another_client_is_served()
    {
        await using var server = new TestServer(new FrontendOptions { MaxInFlightRequestsPerConnection = 8 });
        await using NbdTestClient attacker = server.Connect();
        await attacker.ConnectAsync();
        // 20 000 requests with an unknown command (560 KB of headers), and not one reply read.
        Task flooding = Task.Run(async () =>
        {
            for (int i = 0; i < 20_000; i++)
            {
                await attacker.SendRequestAsync((NbdCommand)42, 0, 0, cookie: (ulong)i);
            }
        });
        await Task.WhenAny(flooding, Task.Delay(TimeSpan.FromSeconds(2)));
        Assert.That(flooding.IsCompleted, Is.False, "the server stops reading a client whose error replies pile up, instead of queuing them without bound");

        await using NbdTestClient other = server.Connect();
        await other.ConnectAsync();
        await other.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: 77);
        Assert.That((await other.ReadSimpleReplyAsync(4096)).Cookie, Is.EqualTo(77UL));

        // Reading the replies lets the flood go on: the attacker was throttled, not broken.
        (NbdError error, ulong cookie, _) = await attacker.ReadSimpleReplyAsync();
        Assert.That((error, cookie), Is.EqualTo((NbdError.EINVAL, 0UL)));
    }

    [Test]
    public async Task A_client_that_never_reads_its_replies_is_closed_after_the_send_timeout_and_its_budget_returned()
    {
        await using var server = new TestServer(OneRequestBudget);
        await using NbdTestClient attacker = server.Connect();
        await attacker.ConnectAsync();
        // 4 MiB of reads: far more than the pipe to the client holds, so a reply stays unsent (the
        // first one already: 64 KiB and its header fill the in-process pipe's 64 KiB).
        for (int i = 0; i < 64; i++)
        {
            await attacker.SendRequestAsync(NbdCommand.Read, 0, 64 * 1024, cookie: (ulong)i);
        }
        // The server takes the attacker's requests on its own time: until its first read holds the
        // whole budget, the other client's request could be admitted first, be served at once, and
        // this test would then drain a healthy connection that never has to time out. (Or the send
        // timeout already fired: a stalled test thread may first look after that.)
        await WaitUntilAsync(() => server.Listener.BytesInFlight == 64 * 1024 || SendTimeouts(server) > 0);

        await using NbdTestClient other = server.Connect();
        await other.ConnectAsync();
        await other.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: 5);
        Assert.That((await other.ReadSimpleReplyAsync(4096)).Cookie, Is.EqualTo(5UL), "served once the attacker's unsent reply gave its budget back");
        Assert.That(SendTimeouts(server), Is.EqualTo(1), "the budget came back through the send timeout, before the other client was served");

        Assert.That(await ReadsToEndAsync(attacker), Is.True, "what was already sent can be read, then the connection ends");
        Assert.That(SendTimeouts(server), Is.EqualTo(1));
        await WaitUntilAsync(() => server.Listener.BytesInFlight == 0);
    }

    [Test]
    public async Task A_write_payload_that_stops_half_way_is_closed_after_the_payload_timeout_and_another_client_is_served()
    {
        await using var server = new TestServer(OneRequestBudget);
        await using NbdTestClient attacker = server.Connect();
        await attacker.ConnectAsync();
        byte[] header = new byte[NbdRequest.Size];
        new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Write, 1, 0, 64 * 1024).Write(header);
        await attacker.WriteAsync([.. header, .. new byte[100]]);
        // As above: the stalled write must hold the budget before the other client asks for it.
        await WaitUntilAsync(() => server.Listener.BytesInFlight == 64 * 1024 || PayloadTimeouts(server) > 0);

        await using NbdTestClient other = server.Connect();
        await other.ConnectAsync();
        await other.SendRequestAsync(NbdCommand.Write, 0, 4096, cookie: 9, payload: Enumerable.Repeat((byte)0x5a, 4096).ToArray());
        Assert.That((await other.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None), "served once the stalled write gave its budget back");

        Assert.That(await attacker.IsClosedAsync(), Is.True);
        Assert.That(PayloadTimeouts(server), Is.EqualTo(1));
        await other.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: 10);
        Assert.That((await other.ReadSimpleReplyAsync(4096)).Data, Is.All.EqualTo(0x5a), "the torn write was never applied over the good one");
        await WaitUntilAsync(() => server.Listener.BytesInFlight == 0);
    }

    [Test]
    public async Task Write_zeroes_is_charged_against_the_byte_budget()
    {
        var volume = new ScriptedVolume(16 << 20) { Gate = new TaskCompletionSource() };
        var options = new FrontendOptions { MaxPayloadBytes = 64 * 1024, MaxInFlightBytesPerConnection = 256 * 1024, MaxInFlightBytesTotal = 1 << 20 };
        await using var server = new TestServer(options, new NbdExport("vol0", volume));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();
        for (int i = 0; i < 16; i++)
        {
            await client.SendRequestAsync(NbdCommand.WriteZeroes, (ulong)i * 65536, 65536, cookie: (ulong)i);
        }
        // Waited for (a loaded machine may take a while), then a fifth is given a moment to show.
        await WaitUntilAsync(() => volume.ZeroesStarted >= 4);
        await Task.Delay(200);
        Assert.That(volume.ZeroesStarted, Is.EqualTo(4), "256 KiB budget / 64 KiB of zeroes");

        volume.Gate.SetResult();
        for (int i = 0; i < 16; i++)
        {
            Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));
        }
        Assert.That(volume.ZeroesStarted, Is.EqualTo(16));
    }

    /// <summary>Reads (and drops) whatever the server sent until it closes; false if it stays open.</summary>
    private static async Task<bool> ReadsToEndAsync(NbdTestClient client)
    {
        byte[] buffer = new byte[64 * 1024];
        try
        {
            while (await client.Stream.ReadAsync(buffer).AsTask().WaitAsync(TimeSpan.FromSeconds(5)) > 0)
            {
            }
            return true;
        }
        catch (IOException)
        {
            return true;
        }
        catch (TimeoutException)
        {
            return false;
        }
    }

    private static int SendTimeouts(TestServer server) => server.Logger.Warnings.Count(w => w.Contains("send timeout", StringComparison.Ordinal));

    private static int PayloadTimeouts(TestServer server) => server.Logger.Warnings.Count(w => w.Contains("payload timeout", StringComparison.Ordinal));

    private static async Task WaitUntilAsync(Func<bool> condition)
    {
        for (int i = 0; i < 100 && !condition(); i++)
        {
            await Task.Delay(50);
        }
        Assert.That(condition(), Is.True);
    }
}
