using Microsoft.Extensions.Time.Testing;
using NbdServer.Nbd;
using NbdServer.Frontend.Server;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// The payload and send deadlines are re-armed per operation. A deadline that fires just after its
/// operation completed (under load the timer and the disarm race) must not close the next one.
/// </summary>
[CancelAfter(30_000)]
public sealed class DeadlineRaceTests
{
    private static readonly FrontendOptions ShortDeadlines = new()
    {
        PayloadTimeout = TimeSpan.FromSeconds(1),
        SendTimeout = TimeSpan.FromSeconds(1),
    };

    [Test]
    public async Task A_send_deadline_that_fires_after_the_send_completed_does_not_close_the_next_reply()
    {
        var time = new FakeTimeProvider();
        await using var server = new TestServer(ShortDeadlines, null, time);
        LateClockStream? wrapped = null;
        await using NbdTestClient client = server.Connect(s => wrapped = new LateClockStream(s, time, ShortDeadlines.SendTimeout * 2));
        await client.ConnectAsync();

        // The first reply's send completes, and only then does its deadline pass (before the disarm).
        wrapped!.AdvanceAfterNextFlush();
        await client.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: 1);
        Assert.That((await client.ReadSimpleReplyAsync(4096)).Cookie, Is.EqualTo(1UL));
        Assert.That(wrapped.Advanced, Is.True, "the clock passed the send deadline right after the first send");

        await client.SendRequestAsync(NbdCommand.Read, 0, 4096, cookie: 2);
        Assert.That((await client.ReadSimpleReplyAsync(4096)).Cookie, Is.EqualTo(2UL), "the honest client's next reply is sent");
        Assert.That(server.Logger.Warnings.Where(w => w.Contains("send timeout", StringComparison.Ordinal)), Is.Empty);
    }

    [Test]
    public void A_deadline_that_fired_after_its_operation_gives_the_next_operation_a_fresh_token()
    {
        var time = new FakeTimeProvider();
        using var parent = new CancellationTokenSource();
        using var deadline = new Deadline(parent.Token, time);

        CancellationToken first = deadline.Arm(TimeSpan.FromSeconds(1));
        // The operation completed; the timer fires before the disarm.
        time.Advance(TimeSpan.FromSeconds(2));
        Assert.That(first.IsCancellationRequested, Is.True);
        deadline.Disarm();

        CancellationToken second = deadline.Arm(TimeSpan.FromSeconds(1));
        Assert.That((second.IsCancellationRequested, deadline.Expired), Is.EqualTo((false, false)));
        time.Advance(TimeSpan.FromMilliseconds(500));
        deadline.Disarm();
        time.Advance(TimeSpan.FromSeconds(5));
        Assert.That(second.IsCancellationRequested, Is.False, "a disarmed deadline never fires");

        CancellationToken third = deadline.Arm(TimeSpan.FromSeconds(1));
        time.Advance(TimeSpan.FromSeconds(1));
        Assert.That((third.IsCancellationRequested, deadline.Expired), Is.EqualTo((true, true)), "an armed deadline still fires");
        deadline.Disarm();

        CancellationToken fourth = deadline.Arm(TimeSpan.FromSeconds(1));
        parent.Cancel();
        Assert.That((fourth.IsCancellationRequested, deadline.Expired), Is.EqualTo((true, false)), "the connection's abort still cancels it, and is not a timeout");
    }

    /// <summary>The server side of a connection whose clock jumps right after a flush completed.</summary>
    private sealed class LateClockStream(Stream inner, FakeTimeProvider time, TimeSpan jump) : Stream
    {
        private int _armed;

        public bool Advanced { get; private set; }

        public override bool CanRead => true;

        public override bool CanSeek => false;

        public override bool CanWrite => true;

        public override long Length => throw new NotSupportedException();

        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

        public void AdvanceAfterNextFlush() => Volatile.Write(ref _armed, 1);

        public override async Task FlushAsync(CancellationToken cancellationToken)
        {
            await inner.FlushAsync(cancellationToken);
            if (Interlocked.Exchange(ref _armed, 0) == 1)
            {
                time.Advance(jump);
                Advanced = true;
            }
        }

        public override void Flush() => inner.Flush();

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => inner.ReadAsync(buffer, cancellationToken);

        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) => inner.WriteAsync(buffer, cancellationToken);

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => inner.ReadAsync(buffer, offset, count, cancellationToken);

        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => inner.WriteAsync(buffer, offset, count, cancellationToken);

        public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, count);

        public override void Write(byte[] buffer, int offset, int count) => inner.Write(buffer, offset, count);

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
