using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using NbdServer.Nbd;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// Strangers who connect and send garbage during the handshake must not flood the log (a line per
/// connection) nor keep an honest client from being served.
/// </summary>
[CancelAfter(60_000)]
public sealed class HandshakeDropFloodTests
{
    private const int Strangers = 1000;

    [Test]
    public async Task A_thousand_strangers_sending_garbage_are_a_few_log_lines_with_a_count_and_an_honest_client_is_served()
    {
        var server = new TestServer(new FrontendOptions { LogThrottleInterval = TimeSpan.FromMinutes(10), MaxOptionsPerHandshake = 4 });
        int linesBefore;
        long served = 0;
        await using (server)
        {
            await using NbdTestClient honest = server.Connect();
            await honest.ConnectAsync();
            using var stop = new CancellationTokenSource();
            Task serving = Task.Run(async () =>
            {
                ulong cookie = 0;
                while (!stop.IsCancellationRequested)
                {
                    await honest.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: ++cookie);
                    Assert.That((await honest.ReadSimpleReplyAsync(4096)).Cookie, Is.EqualTo(cookie));
                    Interlocked.Increment(ref served);
                }
            });

            var random = new Random(10);
            var attacks = new List<Task>();
            for (int i = 0; i < Strangers; i++)
            {
                // Peer-chosen values differ on every connection: a throttle keyed by them would not help.
                int kind = i % 4;
                uint value = (uint)random.Next() | 0x8000_0000;
                attacks.Add(AttackAsync(server.Connect(), kind, value));
            }
            await Task.WhenAll(attacks);
            await stop.CancelAsync();
            await serving;
            linesBefore = server.Logger.Lines.Count(l => l.Level >= LogLevel.Information);
        }

        Assert.That(Interlocked.Read(ref served), Is.GreaterThan(0), "the honest client was served during the flood");
        Assert.That(linesBefore, Is.LessThanOrEqualTo(8), "a line per kind of drop, not one per stranger:\n" + string.Join("\n", server.Logger.Lines.Select(l => l.Message).Take(20)));
        long counted = server.Logger.Lines
            .Select(l => l.Message)
            .Where(m => m.Contains("repeated", StringComparison.Ordinal))
            .Sum(m => long.Parse(m.Split("repeated ")[1].Split(' ')[0], System.Globalization.NumberStyles.AllowThousands, System.Globalization.CultureInfo.InvariantCulture));
        int firsts = server.Logger.Warnings.Count(w => w.Contains("dropped during the handshake", StringComparison.Ordinal) && !w.Contains("repeated", StringComparison.Ordinal));
        Assert.That(counted + firsts, Is.EqualTo(Strangers), "every drop is counted");
    }

    [Test]
    public async Task Connections_refused_at_the_cap_are_a_line_with_a_count_and_the_admitted_client_is_served()
    {
        await using var volume = new MemoryVolume(1 << 20);
        var logger = new CapturingLogger();
        var listener = new NbdListener(new ExportRegistry([new NbdExport("vol0", volume)]), new FrontendOptions { Listen = new IPEndPoint(IPAddress.Loopback, 0), MaxConnections = 1, LogThrottleInterval = TimeSpan.FromMinutes(10) }, logger);
        await using (listener)
        {
            listener.Start();
            using var admitted = new TcpClient();
            await admitted.ConnectAsync(listener.LocalEndPoint);
            await using var client = new NbdTestClient(admitted.GetStream());
            await client.ConnectAsync();

            for (int i = 0; i < 50; i++)
            {
                using var refused = new TcpClient();
                await refused.ConnectAsync(listener.LocalEndPoint);
                await using var probe = new NbdTestClient(refused.GetStream());
                Assert.That(await probe.IsClosedAsync(TimeSpan.FromSeconds(5)), Is.True);
            }

            await client.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: 9);
            Assert.That((await client.ReadSimpleReplyAsync(4096)).Cookie, Is.EqualTo(9UL));
            Assert.That(logger.Warnings.Count(w => w.Contains("connections is reached", StringComparison.Ordinal)), Is.EqualTo(1));
        }
        Assert.That(logger.Warnings.Single(w => w.Contains("connections is reached: repeated", StringComparison.Ordinal)), Does.Contain("repeated 49 times"));
    }

    private static async Task AttackAsync(NbdTestClient stranger, int kind, uint value)
    {
        await using (stranger)
        {
            await stranger.ReadGreetingAsync();
            switch (kind)
            {
                case 0:
                    await stranger.SendClientFlagsAsync(value);
                    break;
                case 1:
                    await stranger.SendClientFlagsAsync(3);
                    await stranger.SendOptionAsync(NbdOption.List, [], magic: value);
                    break;
                case 2:
                    await stranger.SendClientFlagsAsync(3);
                    await stranger.WriteAsync([.. BigEndian64(NbdMagic.Option), .. NbdTestClient.BigEndian32((uint)NbdOption.ExportName), .. NbdTestClient.BigEndian32(value)]);
                    break;
                default:
                    await stranger.SendClientFlagsAsync(3);
                    for (int i = 0; i < 4; i++)
                    {
                        await stranger.SendOptionAsync((NbdOption)(value + (uint)i), []);
                        await stranger.ReadOptionReplyAsync();
                    }
                    break;
            }
            Assert.That(await stranger.IsClosedAsync(TimeSpan.FromSeconds(10)), Is.True);
        }
    }

    private static byte[] BigEndian64(ulong value)
    {
        byte[] bytes = new byte[8];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(bytes, value);
        return bytes;
    }
}

/// <summary>A client must not be able to fill the log throttle's table and hide other errors.</summary>
[CancelAfter(60_000)]
public sealed class RequestFailureFloodTests
{
    [Test]
    public async Task Unknown_commands_from_many_connections_do_not_push_other_errors_into_the_overflow_count()
    {
        await using var server = new TestServer(new FrontendOptions { LogThrottleInterval = TimeSpan.FromMinutes(10) });
        // 300 connections, each with its own unknown command number: 300 distinct (connection, command) pairs.
        for (int i = 0; i < 300; i++)
        {
            await using NbdTestClient attacker = server.Connect();
            await attacker.ConnectAsync();
            await attacker.SendRequestAsync((NbdCommand)(100 + i), 0, 0, cookie: (ulong)i);
            Assert.That((await attacker.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.EINVAL));
        }

        // Then a different failure from an honest client: it must get its own first line.
        await using NbdTestClient honest = server.Connect();
        await honest.ConnectAsync();
        await honest.SendRequestAsync(NbdCommand.Read, 1UL << 40, 4096, cookie: 1);
        Assert.That((await honest.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.EINVAL));

        IEnumerable<string> warnings = server.Logger.Warnings.ToList();
        Assert.That(warnings.Count(w => w.Contains("unknown command", StringComparison.Ordinal)), Is.EqualTo(1), "one line for the flood of unknown commands");
        Assert.That(warnings.Any(w => w.Contains("Read with EINVAL", StringComparison.Ordinal) && w.Contains("beyond the end", StringComparison.Ordinal)), Is.True, "the other error is logged with its details");
        Assert.That(warnings.Where(w => w.Contains("other repeated errors", StringComparison.Ordinal)), Is.Empty);
    }
}
