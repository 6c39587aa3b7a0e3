using Nerdbank.Streams;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// The client's link discipline against a scripted downstairs: requests reach the replica in the order
/// they were issued, a broken sender fails the link at once, and a failed job is reported only once the
/// client can no longer touch its memory.
/// </summary>
[CancelAfter(20_000)]
public sealed class ClientLinkTests
{
    private const int BlockSize = 4096;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(5);

    [Test]
    public async Task Overlapping_writes_reach_a_downstairs_with_a_small_job_limit_in_the_order_they_were_issued()
    {
        const int Writes = 400;
        const int MaxJobs = 4;
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        await using var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(client, peer, maxJobs: MaxJobs);
        try
        {
            // Every write covers block 0: any reordering on the way is a different final block.
            byte[][] data = [.. Enumerable.Range(0, Writes).Select(i => TestData.Block(BlockSize, 0, i))];
            var writes = new Task<DownstairsResult>[Writes];
            for (int i = 0; i < Writes; i++)
            {
                writes[i] = c.WriteAsync((ulong)i + 1, 0, data[i]);
            }

            // The downstairs answers each window of MaxJobs writes with one batch of replies, as a real one does.
            var seen = new List<ulong>();
            while (seen.Count < Writes)
            {
                var window = new List<ulong>();
                while (window.Count < MaxJobs && seen.Count + window.Count < Writes)
                {
                    (FrameHeader header, _) = await peer.ReceiveAsync() ?? throw new IOException("client closed");
                    window.Add(header.JobId);
                }
                seen.AddRange(window);
                await peer.SendAsync([.. window.SelectMany(id => RawPeer.Frame(MessageType.WriteReply, id, []))]);
            }

            Assert.That(seen, Is.EqualTo(Enumerable.Range(1, Writes).Select(i => (ulong)i)));
            Assert.That((await Task.WhenAll(writes).WaitAsync(Patience)).Select(r => r.Code), Is.All.EqualTo(ResultCode.Ok));
        }
        finally
        {
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task A_send_that_fails_fails_the_pending_job_and_every_later_one_at_once()
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        var transport = new ScriptedWriteStream(client);
        await using var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(transport, peer);
        try
        {
            transport.FailWrites = true;
            Task<DownstairsResult> pending = c.WriteAsync(1, 0, TestData.Block(BlockSize, 0, 1));
            // The peer is alive and keeps the receive side open: only the sender knows the link is gone.
            Assert.That(async () => await pending.WaitAsync(Patience), Throws.InstanceOf<DownstairsConnectionException>());
            Assert.That(async () => await c.WriteAsync(2, 0, TestData.Block(BlockSize, 0, 2)).WaitAsync(Patience), Throws.InstanceOf<DownstairsConnectionException>());
            Assert.That(c.Failure, Is.InstanceOf<DownstairsConnectionException>());
        }
        finally
        {
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task A_failed_link_reports_a_write_only_after_the_sender_has_let_go_of_its_payload()
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        var transport = new ScriptedWriteStream(client);
        var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(transport, peer);
        try
        {
            // Big enough to be written straight from the caller's memory (not coalesced into a copy).
            byte[] payload = new byte[FrameSender.CoalesceBytes * 2];
            transport.BlockWrites = true;
            Task<DownstairsResult> writing = c.WriteAsync(1, 0, payload);
            Task<bool> releasedWhenReported = writing.ContinueWith(_ => transport.Released, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            await transport.WriteBlocked.WaitAsync(Patience);

            // The link fails (the peer goes away) while the transport still holds the payload.
            await peer.DisposeAsync();
            await c.Completion.WaitAsync(Patience);
            transport.ReleaseWrites();

            Assert.That(async () => await writing.WaitAsync(Patience), Throws.InstanceOf<DownstairsConnectionException>());
            Assert.That(await releasedWhenReported, Is.True, "the write was reported failed while the transport still held its payload");
        }
        finally
        {
            transport.ReleaseWrites();
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task A_failed_link_calls_no_reply_handler_while_the_transport_still_holds_the_payload()
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        var transport = new ScriptedWriteStream(client);
        var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(transport, peer);
        var handler = new RecordingHandler();
        try
        {
            byte[] payload = new byte[FrameSender.CoalesceBytes * 2];
            transport.BlockWrites = true;
            c.SubmitWrite(1, 0, payload, Hashes(payload), handler);
            await transport.WriteBlocked.WaitAsync(Patience);

            await peer.DisposeAsync();
            // The receive loop has ended and failed what it could: nothing may be reported yet.
            await c.Completion.WaitAsync(Patience);
            Assert.That(handler.Replies, Is.Empty);

            transport.ReleaseWrites();
            (ulong job, DownstairsResult result) = await handler.Next.WaitAsync(Patience);
            Assert.That(job, Is.EqualTo(1));
            Assert.That(result.IsLinkFailure, Is.True);
        }
        finally
        {
            transport.ReleaseWrites();
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task A_reply_that_overtakes_its_own_request_is_held_until_the_send_is_done()
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        var transport = new ScriptedWriteStream(client);
        await using var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(transport, peer);
        var handler = new RecordingHandler();
        try
        {
            byte[] payload = new byte[FrameSender.CoalesceBytes * 2];
            transport.BlockWrites = true;
            c.SubmitWrite(1, 0, payload, Hashes(payload), handler);
            await transport.WriteBlocked.WaitAsync(Patience);

            // A hostile downstairs guesses the job id and answers before the request has left.
            await peer.SendAsync(MessageType.WriteReply, 1, []);
            while (c.InFlight > 0)
            {
                await Task.Delay(1);
            }
            Assert.That(handler.Replies, Is.Empty, "reported while the sender still reads the payload");

            transport.ReleaseWrites();
            (ulong job, _) = await handler.Next.WaitAsync(Patience);
            Assert.That(job, Is.EqualTo(1));
            Assert.That(handler.Replies, Has.Count.EqualTo(1));
        }
        finally
        {
            transport.ReleaseWrites();
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task A_job_submitted_after_the_link_failed_is_reported_failed_once_and_not_from_inside_submit()
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(client, peer);
        var handler = new RecordingHandler();
        try
        {
            await peer.DisposeAsync();
            await c.Completion.WaitAsync(Patience);

            byte[] data = TestData.Block(BlockSize, 0, 1);
            handler.InSubmit = true;
            c.SubmitWrite(7, 0, data, Hashes(data), handler);
            handler.InSubmit = false;

            (ulong job, DownstairsResult result) = await handler.Next.WaitAsync(Patience);
            Assert.That((job, result.IsLinkFailure, handler.CalledInsideSubmit), Is.EqualTo((7UL, true, false)));
            Assert.That(handler.Replies, Has.Count.EqualTo(1));
        }
        finally
        {
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task Jobs_submitted_in_a_batch_go_out_together_in_submission_order_at_its_end()
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        await using var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(client, peer);
        var handler = new RecordingHandler();
        try
        {
            byte[] data = TestData.Block(BlockSize, 0, 1);
            c.BeginBatch();
            c.BeginBatch();
            for (ulong id = 1; id <= 8; id++)
            {
                c.SubmitWrite(id, 0, data, Hashes(data), handler);
            }
            c.EndBatch();
            Assert.That(c.InFlight, Is.EqualTo(8));
            c.EndBatch();

            var seen = new List<ulong>();
            for (int i = 0; i < 8; i++)
            {
                (FrameHeader header, _) = await peer.ReceiveAsync() ?? throw new IOException("client closed");
                seen.Add(header.JobId);
                await peer.SendAsync(MessageType.WriteReply, header.JobId, []);
            }
            Assert.That(seen, Is.EqualTo(new ulong[] { 1, 2, 3, 4, 5, 6, 7, 8 }));
            await handler.Count(8).WaitAsync(Patience);
            Assert.That(handler.Replies.Select(r => r.Result.IsOk), Is.All.True);
            Assert.That(() => c.EndBatch(), Throws.InvalidOperationException);
        }
        finally
        {
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task A_link_that_fails_during_a_batch_reports_every_held_job_once()
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(client, peer);
        var handler = new RecordingHandler();
        try
        {
            byte[] data = TestData.Block(BlockSize, 0, 1);
            c.BeginBatch();
            for (ulong id = 1; id <= 4; id++)
            {
                c.SubmitWrite(id, 0, data, Hashes(data), handler);
            }
            await peer.DisposeAsync();
            await c.Completion.WaitAsync(Patience);
            c.EndBatch();

            await handler.Count(4).WaitAsync(Patience);
            Assert.That(handler.Replies.Select(r => r.Job).Order(), Is.EqualTo(new ulong[] { 1, 2, 3, 4 }));
            Assert.That(handler.Replies.Select(r => r.Result.IsLinkFailure), Is.All.True);
        }
        finally
        {
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    [Test]
    public async Task Submitting_allocates_next_to_nothing_per_job_once_the_client_is_warm()
    {
        const int Jobs = 1000; // within the pool's bound (1024 job records)
        (Stream client, Stream server) = FullDuplexStream.CreatePair(new System.IO.Pipelines.PipeOptions(pauseWriterThreshold: 64 << 20, resumeWriterThreshold: 32 << 20));
        await using var peer = new RawPeer(server);
        DownstairsClient c = await ConnectAsync(client, peer);
        var handler = new CountingHandler();
        byte[] data = TestData.Block(BlockSize, 0, 1);
        byte[] hashes = Hashes(data);
        try
        {
            long allocated = 0;
            for (int round = 0; round < 3; round++)
            {
                long before = GC.GetAllocatedBytesForCurrentThread();
                for (int i = 0; i < Jobs; i++)
                {
                    c.SubmitWrite((ulong)((round * Jobs) + i + 1), 0, data, hashes, handler);
                }
                allocated = GC.GetAllocatedBytesForCurrentThread() - before;
                for (int i = 0; i < Jobs; i++)
                {
                    (FrameHeader header, _) = await peer.ReceiveAsync() ?? throw new IOException("client closed");
                    await peer.SendAsync(MessageType.WriteReply, header.JobId, []);
                }
                await handler.Reached((round + 1) * Jobs).WaitAsync(Patience);
            }
            TestContext.Out.WriteLine($"{allocated} bytes allocated by {Jobs} submissions on a warm client ({(double)allocated / Jobs:0.0} per job)");
            // Pooled job records and frames, no completion source (measured: 0 bytes; the bound leaves room for
            // the send queue's occasional segment). The Task-returning calls spend ~350 bytes per job.
            Assert.That((double)allocated / Jobs, Is.LessThan(32));
        }
        finally
        {
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    private sealed class CountingHandler : IDownstairsReplyHandler
    {
        private int _count;
        private int _target;
        private TaskCompletionSource? _waiter;

        public Task Reached(int count)
        {
            var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            Volatile.Write(ref _target, count);
            Volatile.Write(ref _waiter, done);
            if (Volatile.Read(ref _count) >= count)
            {
                done.TrySetResult();
            }
            return done.Task;
        }

        public void OnReply(ulong jobId, DownstairsResult result, ExtentMeta meta)
        {
            int n = Interlocked.Increment(ref _count);
            if (n >= Volatile.Read(ref _target))
            {
                Volatile.Read(ref _waiter)?.TrySetResult();
            }
        }
    }

    private static byte[] Hashes(byte[] data)
    {
        byte[] hashes = new byte[data.Length / BlockSize * Wire.HashSize];
        BlockContext.HashBlocks(data, BlockSize, hashes);
        return hashes;
    }

    /// <summary>Records every report; <see cref="Next"/> completes with the first, <see cref="Count"/> with the n-th.</summary>
    private sealed class RecordingHandler : IDownstairsReplyHandler
    {
        private readonly Lock _lock = new();
        private readonly List<(ulong Job, DownstairsResult Result)> _replies = [];
        private readonly List<(int Count, TaskCompletionSource Done)> _waiters = [];
        private readonly TaskCompletionSource<(ulong, DownstairsResult)> _first = new(TaskCreationOptions.RunContinuationsAsynchronously);

        /// <summary>Per thread: a report made on another thread while the caller is inside Submit is fine.</summary>
        [ThreadStatic]
        private static bool t_inSubmit;

        public bool InSubmit { set => t_inSubmit = value; }

        public bool CalledInsideSubmit { get; private set; }

        public Task<(ulong Job, DownstairsResult Result)> Next => _first.Task;

        public List<(ulong Job, DownstairsResult Result)> Replies
        {
            get
            {
                lock (_lock)
                {
                    return [.. _replies];
                }
            }
        }

        public Task Count(int count)
        {
            lock (_lock)
            {
                var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                if (_replies.Count >= count)
                {
                    done.SetResult();
                }
                else
                {
                    _waiters.Add((count, done));
                }
                return done.Task;
            }
        }

        public void OnReply(ulong jobId, DownstairsResult result, ExtentMeta meta)
        {
            CalledInsideSubmit |= t_inSubmit;
            lock (_lock)
            {
                _replies.Add((jobId, result));
                foreach ((int count, TaskCompletionSource done) in _waiters)
                {
                    if (_replies.Count >= count)
                    {
                        done.TrySetResult();
                    }
                }
            }
            _first.TrySetResult((jobId, result));
        }
    }

    private static async Task<DownstairsClient> ConnectAsync(Stream client, RawPeer peer, int maxJobs = 1024)
    {
        Task<DownstairsClient> connecting = DownstairsClient.ConnectAsync(client, new HelloRequest(Wire.ProtocolVersion, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 3),
            new DownstairsClientOptions { PingInterval = TimeSpan.Zero });
        Assert.That(await peer.ReceiveAsync(), Is.Not.Null, "the Hello arrived");
        var reply = new HelloReply(Wire.ProtocolVersion, false, Guid.NewGuid(), BlockSize, 512, 4, Wire.DefaultMaxFrameBytes, maxJobs, 3, new ExtentMeta[4]);
        OutgoingFrame frame = reply.Encode();
        await peer.SendAsync([.. frame.Prefix.AsSpan(0, frame.PrefixLength)]);
        frame.ReturnPrefix();
        return await connecting.WaitAsync(Patience);
    }

    /// <summary>A transport whose writes can be made to fail, or to block until released (the payload still in use).</summary>
    private sealed class ScriptedWriteStream(Stream inner) : Stream
    {
        private readonly TaskCompletionSource _blocked = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly TaskCompletionSource _release = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public volatile bool FailWrites;
        public volatile bool BlockWrites;

        public Task WriteBlocked => _blocked.Task;

        public bool Released { get; private set; }

        public void ReleaseWrites()
        {
            Released = true;
            _release.TrySetResult();
        }

        public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            if (BlockWrites)
            {
                _blocked.TrySetResult();
                await _release.Task;
                throw new IOException("transport aborted the write");
            }
            if (FailWrites)
            {
                throw new IOException("transport write failed");
            }
            await inner.WriteAsync(buffer, cancellationToken);
        }

        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => inner.ReadAsync(buffer, cancellationToken);

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => inner.ReadAsync(buffer, offset, count, cancellationToken);

        public override Task FlushAsync(CancellationToken cancellationToken) => FailWrites ? Task.FromException(new IOException("transport write failed")) : inner.FlushAsync(cancellationToken);

        public override bool CanRead => true;

        public override bool CanSeek => false;

        public override bool CanWrite => true;

        public override long Length => throw new NotSupportedException();

        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

        public override void Flush() => inner.Flush();

        public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, count);

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

        public override void SetLength(long value) => throw new NotSupportedException();

        public override void Write(byte[] buffer, int offset, int count) => WriteAsync(buffer, offset, count).GetAwaiter().GetResult();

        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                // Like a socket, closing ends the receive side; unlike one, a write in progress stays blocked
                // (a TLS stream may still be reading its payload): the client must not assume it stopped.
                inner.Dispose();
            }
            base.Dispose(disposing);
        }

        public override async ValueTask DisposeAsync()
        {
            await inner.DisposeAsync();
            await base.DisposeAsync();
        }
    }
}
