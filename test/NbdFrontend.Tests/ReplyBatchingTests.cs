using NbdServer.Common.Volumes;
using NbdServer.Frontend.Server;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Tests;

/// <summary>How replies are grouped into sends: one per receive when requests complete inline.</summary>
[CancelAfter(30_000)]
public sealed class ReplyBatchingTests
{
    private const int Requests = 32;

    [Test]
    public async Task Requests_from_one_receive_that_complete_inline_are_answered_in_one_send()
    {
        await using var server = new TestServer();
        CountingStream? counted = null;
        await using NbdTestClient client = server.Connect(s => counted = new CountingStream(s));
        await client.ConnectAsync();
        int flushesBefore = counted!.Flushes;

        // 32 small reads written as one block of bytes: one receive on the server's side.
        byte[] requests = new byte[Requests * NbdRequest.Size];
        for (int i = 0; i < Requests; i++)
        {
            new NbdRequest(NbdMagic.Request, CommandFlags.None, NbdCommand.Read, (ulong)i, (ulong)i * 512, 512).Write(requests.AsSpan(i * NbdRequest.Size));
        }
        await client.WriteAsync(requests);

        var cookies = new List<ulong>();
        for (int i = 0; i < Requests; i++)
        {
            (NbdError error, ulong cookie, _) = await client.ReadSimpleReplyAsync(512);
            Assert.That(error, Is.EqualTo(NbdError.None));
            cookies.Add(cookie);
        }
        Assert.That(cookies, Is.EquivalentTo(Enumerable.Range(0, Requests).Select(i => (ulong)i)));
        Assert.That(counted.Flushes - flushesBefore, Is.EqualTo(1), "one send for the whole batch");
    }

    [Test]
    public async Task A_reply_completing_later_is_sent_without_waiting_for_another_request()
    {
        var volume = new ScriptedVolume(1 << 20) { Gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously), GatedReadOffset = 4096 };
        await using var server = new TestServer(null, new NbdExport("vol0", volume, "gated"));
        await using NbdTestClient client = server.Connect();
        await client.ConnectAsync();

        await client.SendRequestAsync(NbdCommand.Read, 4096, 512, cookie: 7);
        await client.SendRequestAsync(NbdCommand.Read, 0, 512, cookie: 8);
        // The ungated read is answered while the gated one still waits.
        Assert.That((await client.ReadSimpleReplyAsync(512)).Cookie, Is.EqualTo(8UL));
        volume.Gate.SetResult();
        Assert.That((await client.ReadSimpleReplyAsync(512)).Cookie, Is.EqualTo(7UL));
    }

    /// <summary>
    /// Counts the server's sends: written bytes are held here and pass to the client only at a flush
    /// (each batch of replies ends with one), the way a gather send leaves a socket. The in-process
    /// pipe beneath makes every write readable at once, so a count taken on the flush alone could
    /// trail what the client has already read: the handshake's last flush could land after the
    /// test's baseline (2 instead of 1), or the batch's after its last reply was read (0).
    /// </summary>
    private sealed class CountingStream(Stream inner) : Stream
    {
        private readonly MemoryStream _unsent = new();
        private int _flushes;

        public int Flushes => Volatile.Read(ref _flushes);

        public override bool CanRead => inner.CanRead;
        public override bool CanSeek => false;
        public override bool CanWrite => inner.CanWrite;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

        public override void Flush()
        {
            // Counted before the bytes go: the client cannot see a send that is not counted yet.
            Interlocked.Increment(ref _flushes);
            inner.Write(_unsent.GetBuffer(), 0, (int)_unsent.Length);
            _unsent.SetLength(0);
            inner.Flush();
        }

        public override async Task FlushAsync(CancellationToken cancellationToken)
        {
            Interlocked.Increment(ref _flushes);
            await inner.WriteAsync(_unsent.GetBuffer().AsMemory(0, (int)_unsent.Length), cancellationToken);
            _unsent.SetLength(0);
            await inner.FlushAsync(cancellationToken);
        }

        public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, count);

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => inner.ReadAsync(buffer, cancellationToken);

        public override void Write(byte[] buffer, int offset, int count) => _unsent.Write(buffer, offset, count);

        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            _unsent.Write(buffer.Span);
            return ValueTask.CompletedTask;
        }

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

        public override void SetLength(long value) => throw new NotSupportedException();

        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                inner.Dispose();
            }
            base.Dispose(disposing);
        }
    }
}
