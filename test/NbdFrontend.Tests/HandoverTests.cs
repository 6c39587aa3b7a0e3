using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using NbdServer.Common.Volumes;
using NbdServer.Frontend.Server;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// Reload without dropping clients: the handover document, and a real TCP client moved from one
/// listener to another in this process between two requests — with the start of its next request
/// already read by the first and the rest read by the second.
/// </summary>
[TestFixture]
[CancelAfter(30_000)]
public sealed partial class HandoverTests
{
    private static readonly HandoverState Sample = new(
        [new HandedListener(HandedListenerKind.Tcp, 7), new HandedListener(HandedListenerKind.Unix, 8)],
        [
            new HandedSession(9, "vol0", TransmissionFlags.HasFlags | TransmissionFlags.SendFlush, StructuredReplies: true, BaseAllocation: false, Pending: [1, 2, 3]),
            new HandedSession(10, "ünïcode", TransmissionFlags.HasFlags, StructuredReplies: false, BaseAllocation: true, Pending: []),
        ]);

    [Test]
    public void The_document_round_trips()
    {
        byte[] bytes = Sample.ToBytes();

        Assert.That(HandoverState.TryRead(bytes, out HandoverState? read, out string error), Is.True, error);
        Assert.That(read!.Listeners, Is.EqualTo(Sample.Listeners));
        Assert.That(read.Sessions, Has.Count.EqualTo(2));
        for (int i = 0; i < 2; i++)
        {
            HandedSession expected = Sample.Sessions[i];
            HandedSession actual = read.Sessions[i];
            Assert.That((actual.Fd, actual.ExportName, actual.Flags, actual.StructuredReplies, actual.BaseAllocation), Is.EqualTo((expected.Fd, expected.ExportName, expected.Flags, expected.StructuredReplies, expected.BaseAllocation)));
            Assert.That(actual.Pending, Is.EqualTo(expected.Pending));
        }
    }

    [Test]
    public void Every_cut_short_document_is_refused()
    {
        byte[] bytes = Sample.ToBytes();
        for (int length = 0; length < bytes.Length; length++)
        {
            Assert.That(HandoverState.TryRead(bytes.AsSpan(0, length), out HandoverState? state, out string error), Is.False, $"{length} of {bytes.Length} bytes");
            Assert.That((state, error), Is.Not.EqualTo(((HandoverState?)null, "")), "a refusal says why");
        }
    }

    [TestCase(0, (byte)0x00, "bad magic")]
    [TestCase(11, (byte)0x02, "version 2")]
    [TestCase(15, (byte)0x03, "3 listeners")]
    [TestCase(24, (byte)0x07, "listener 0: kind")]
    public void A_malformed_header_or_listener_is_refused_with_the_reason(int offset, byte value, string reason)
    {
        byte[] bytes = Sample.ToBytes();
        bytes[offset] = value;

        Assert.That(HandoverState.TryRead(bytes, out _, out string error), Is.False);
        Assert.That(error, Does.Contain(reason));
    }

    [Test]
    public void Trailing_bytes_and_oversized_lengths_are_refused()
    {
        byte[] bytes = Sample.ToBytes();
        Assert.That(HandoverState.TryRead([.. bytes, 0], out _, out string trailing), Is.False);
        Assert.That(trailing, Does.Contain("after the last session"));

        // The first session's pending length, set past the limit.
        int pendingLength = HandoverState.HeaderSize + (2 * HandoverState.ListenerSize) + 4;
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(pendingLength), HandoverState.MaxPendingBytes + 1u);
        Assert.That(HandoverState.TryRead(bytes, out _, out string oversized), Is.False);
        Assert.That(oversized, Does.Contain("pending bytes"));
    }

    [Test]
    public async Task A_client_moves_to_the_next_listener_between_two_requests_and_a_half_sent_request_completes_there()
    {
        var volume = new Volumes.MemoryVolume(8L << 20);
        var exports = new ExportRegistry([new NbdExport("vol0", volume)]);
        var options = new FrontendOptions { Listen = new IPEndPoint(IPAddress.Loopback, 0), HandoverHandshakeGrace = TimeSpan.FromMilliseconds(300) };
        var firstLog = new CapturingLogger();
        await using var first = new NbdListener(exports, options, firstLog);
        first.Start();
        IPEndPoint endPoint = first.LocalEndPoint;

        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(endPoint);
        await using var client = new NbdTestClient(new NetworkStream(socket));
        await client.ConnectAsync("vol0");
        byte[] block = [.. Enumerable.Range(0, 4096).Select(i => (byte)(i * 7))];
        await client.SendRequestAsync(NbdCommand.Write, 4096, 4096, cookie: 1, payload: block);
        Assert.That((await client.ReadSimpleReplyAsync()).Error, Is.EqualTo(NbdError.None));

        // A stranger that does not finish its handshake within the grace is not handed over: it is
        // closed, to connect again.
        using var negotiating = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await negotiating.ConnectAsync(endPoint);
        await using var stranger = new NbdTestClient(new NetworkStream(negotiating));
        await stranger.ReadGreetingAsync();
        await WaitForAsync(() => first.ConnectionCount == 2);

        // The first half of the next request's header is on the wire before the handover.
        byte[] read = new byte[NbdRequest.Size];
        new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Read, 2, 4096, 4096).Write(read);
        await client.WriteAsync(read[..10]);
        await Task.Delay(50);

        (HandoverState state, IReadOnlyList<Socket> sockets, int closed) = await first.HandOverAsync();

        Assert.That(state.Sessions, Has.Count.EqualTo(1));
        Assert.That(closed, Is.EqualTo(1), "the negotiating connection");
        Assert.That(state.Listeners.Select(l => l.Kind), Is.EqualTo(new[] { HandedListenerKind.Tcp }));
        Assert.That(state.Sessions[0].Pending, Is.EqualTo(read[..10]), "what the first listener read and no request took");
        Assert.That(await stranger.IsClosedAsync(TimeSpan.FromSeconds(5)), Is.True);

        // The next image gets the same sockets under new numbers (exec keeps the numbers; here
        // both listeners share one process, so the first one's copies are closed instead).
        HandoverState duplicated = new(
            [.. state.Listeners.Select(l => l with { Fd = Dup(l.Fd) })],
            [.. state.Sessions.Select(s => s with { Fd = Dup(s.Fd) })]);
        foreach (Socket s in sockets)
        {
            s.Dispose();
        }
        var secondLog = new CapturingLogger();
        await using var second = new NbdListener(exports, options with { Listen = endPoint }, secondLog);
        second.Start(HandoverState.TryRead(duplicated.ToBytes(), out HandoverState? parsed, out string error) ? parsed : throw new AssertionException(error));

        Assert.That(second.LocalEndPoint, Is.EqualTo(endPoint), "the listening socket was taken over, not bound anew");
        await client.WriteAsync(read[10..]);
        (NbdError status, ulong cookie, byte[] data) = await client.ReadSimpleReplyAsync(4096);
        Assert.That((status, cookie), Is.EqualTo((NbdError.None, 2UL)));
        Assert.That(data, Is.EqualTo(block));
        Assert.That(secondLog.Lines.Select(l => l.Message), Has.Some.Contains("resumed on export 'vol0'"));

        // And the handed listener accepts new clients.
        using var late = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await late.ConnectAsync(endPoint);
        await using var lateClient = new NbdTestClient(new NetworkStream(late));
        await lateClient.ConnectAsync("vol0");
        await lateClient.SendRequestAsync(NbdCommand.Read, 4096, 4096, cookie: 3);
        Assert.That((await lateClient.ReadSimpleReplyAsync(4096)).Data, Is.EqualTo(block));
    }

    [Test]
    public async Task A_request_whose_payload_is_still_arriving_is_finished_before_the_handover()
    {
        var volume = new Volumes.MemoryVolume(8L << 20);
        var exports = new ExportRegistry([new NbdExport("vol0", volume)]);
        await using var listener = new NbdListener(exports, new FrontendOptions { Listen = new IPEndPoint(IPAddress.Loopback, 0) }, new CapturingLogger());
        listener.Start();
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(listener.LocalEndPoint);
        await using var client = new NbdTestClient(new NetworkStream(socket));
        await client.ConnectAsync("vol0");

        byte[] payload = [.. Enumerable.Range(0, 1 << 20).Select(i => (byte)i)];
        byte[] header = new byte[NbdRequest.Size];
        new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Write, 5, 0, (uint)payload.Length).Write(header);
        await client.WriteAsync([.. header, .. payload[..1000]]);
        await Task.Delay(100);
        Task<(HandoverState State, IReadOnlyList<Socket> Sockets, int Closed)> handover = listener.HandOverAsync();
        await Task.Delay(200);
        Assert.That(handover.IsCompleted, Is.False, "the write is half read: the handover waits for its end");

        await client.WriteAsync(payload[1000..]);
        (NbdError status, ulong cookie, _) = await client.ReadSimpleReplyAsync();
        (HandoverState state, IReadOnlyList<Socket> sockets, _) = await handover;

        Assert.That((status, cookie), Is.EqualTo((NbdError.None, 5UL)), "answered by the image that read it");
        Assert.That(state.Sessions.Single().Pending, Is.Empty);
        byte[] written = new byte[payload.Length];
        await volume.ReadAsync(0, written, CancellationToken.None);
        Assert.That(written, Is.EqualTo(payload));
        foreach (Socket s in sockets)
        {
            s.Dispose();
        }
    }

    [Test]
    public async Task Half_a_header_that_arrived_with_a_request_the_loop_was_still_running_goes_over_whole()
    {
        // The handover comes while the request loop is busy inside a batch (here: a read that
        // blocks the loop's own thread), not parked in a read; the batch ends on half a header,
        // which the loop has already marked as examined.
        var volume = new ScriptedVolume(8L << 20) { GatedReadOffset = 4096, BlockingReadGate = new ManualResetEventSlim() };
        var exports = new ExportRegistry([new NbdExport("vol0", volume)]);
        await using var listener = new NbdListener(exports, new FrontendOptions { Listen = new IPEndPoint(IPAddress.Loopback, 0) }, new CapturingLogger());
        listener.Start();
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(listener.LocalEndPoint);
        await using var client = new NbdTestClient(new NetworkStream(socket));
        await client.ConnectAsync("vol0");

        byte[] first = new byte[NbdRequest.Size];
        new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Read, 1, 4096, 4096).Write(first);
        byte[] next = new byte[NbdRequest.Size];
        new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Read, 2, 0, 4096).Write(next);
        await client.WriteAsync([.. first, .. next[..10]]);
        Assert.That(volume.BlockedReadEntered.Wait(TimeSpan.FromSeconds(10)), Is.True, "the first read reached the volume");
        Task<(HandoverState State, IReadOnlyList<Socket> Sockets, int Closed)> handover = listener.HandOverAsync();
        await Task.Delay(100);
        volume.BlockingReadGate.Set();
        (NbdError status, ulong cookie, _) = await client.ReadSimpleReplyAsync(4096);
        (HandoverState state, IReadOnlyList<Socket> sockets, _) = await handover.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.That((status, cookie), Is.EqualTo((NbdError.None, 1UL)));
        Assert.That(state.Sessions.Single().Pending, Is.EqualTo(next[..10]));
        foreach (Socket s in sockets)
        {
            s.Dispose();
        }
    }

    [Test]
    public async Task A_client_stalled_half_way_through_a_write_is_closed_at_the_handover_timeout_and_the_others_go_over()
    {
        var exports = new ExportRegistry([new NbdExport("vol0", new Volumes.MemoryVolume(8L << 20))]);
        var options = new FrontendOptions { Listen = new IPEndPoint(IPAddress.Loopback, 0), HandoverTimeout = TimeSpan.FromMilliseconds(500) };
        await using var listener = new NbdListener(exports, options, new CapturingLogger());
        listener.Start();
        using var stalledSocket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await stalledSocket.ConnectAsync(listener.LocalEndPoint);
        await using var stalled = new NbdTestClient(new NetworkStream(stalledSocket));
        await stalled.ConnectAsync("vol0");
        using var goodSocket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await goodSocket.ConnectAsync(listener.LocalEndPoint);
        await using var good = new NbdTestClient(new NetworkStream(goodSocket));
        await good.ConnectAsync("vol0");

        byte[] header = new byte[NbdRequest.Size];
        new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Write, 9, 0, 65536).Write(header);
        await stalled.WriteAsync([.. header, .. new byte[100]]);
        await Task.Delay(200);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        (HandoverState state, IReadOnlyList<Socket> sockets, int closed) = await listener.HandOverAsync().WaitAsync(TimeSpan.FromSeconds(20));

        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(5)), "not the 60 s payload timeout");
        Assert.That((state.Sessions.Count, closed), Is.EqualTo((1, 1)));
        Assert.That(await stalled.IsClosedAsync(TimeSpan.FromSeconds(5)), Is.True);
        foreach (Socket s in sockets)
        {
            s.Dispose();
        }
    }

    [Test]
    public async Task A_client_that_finishes_its_handshake_during_the_grace_is_handed_over()
    {
        var exports = new ExportRegistry([new NbdExport("vol0", new Volumes.MemoryVolume(8L << 20))]);
        await using var listener = new NbdListener(exports, new FrontendOptions { Listen = new IPEndPoint(IPAddress.Loopback, 0), HandoverHandshakeGrace = TimeSpan.FromSeconds(20) }, new CapturingLogger());
        listener.Start();
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(listener.LocalEndPoint);
        await using var client = new NbdTestClient(new NetworkStream(socket));
        await client.ReadGreetingAsync();

        Task<(HandoverState State, IReadOnlyList<Socket> Sockets, int Closed)> handover = listener.HandOverAsync();
        await client.SendClientFlagsAsync(3);
        await client.SendOptionAsync(NbdOption.Go, NbdTestClient.InfoRequest("vol0"));
        List<NbdTestClient.OptionReply> replies = await client.ReadOptionRepliesAsync();
        Assert.That(replies[^1].Type, Is.EqualTo(OptionReplyType.Ack));
        (HandoverState state, IReadOnlyList<Socket> sockets, int closed) = await handover.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.That((state.Sessions.Count, closed), Is.EqualTo((1, 0)));
        Assert.That(state.Sessions[0].ExportName, Is.EqualTo("vol0"));
        foreach (Socket s in sockets)
        {
            s.Dispose();
        }
    }

    private static async Task WaitForAsync(Func<bool> condition)
    {
        for (int i = 0; i < 200 && !condition(); i++)
        {
            await Task.Delay(25);
        }
        Assert.That(condition(), Is.True);
    }

    private static int Dup(int fd)
    {
        int copy = dup(fd);
        Assert.That(copy, Is.GreaterThanOrEqualTo(0), $"dup: errno {Marshal.GetLastPInvokeError()}");
        return copy;
    }

    [LibraryImport("libc", EntryPoint = "dup", SetLastError = true)]
    private static partial int dup(int fd);
}
