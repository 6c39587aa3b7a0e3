using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Posix;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Server;

internal sealed partial class DownstairsConnection
{
    /// <summary>
    /// Largest block read or write run on the receive path (<see cref="RequestJob.MayRunInline"/>).
    /// 4k jobs gain from running inline (docs/benchmarks.md); large ones hold up the receive path
    /// while two IO threads could run them side by side: with every write inline, a 256 KiB
    /// sequential fill (nbdcopy, replicated volume) left one replica 64 MiB behind, faulted by the
    /// engine, in the fill measured that way (the old build: 1 fault in 3 fills on the same load).
    /// </summary>
    internal const int InlineMaxBytes = 64 << 10;

    /// <summary>One admitted request; runs on an IO thread (or the receive path) and always produces exactly one reply.</summary>
    private sealed class RequestJob(DownstairsConnection connection, FrameHeader header, JobAccess access, long first, long end) : IoJob
    {
        private readonly long _arrived = Stopwatch.GetTimestamp();
        private bool _failed;
        private bool _replied;

        public override long FirstBlock => first;

        public override long EndBlock => end;

        public override JobAccess Access => access;

        public BlockRange Range { get; init; }

        public ExtentRange Extent { get; init; }

        public FlushRequest Flush { get; init; }

        public ExtentCommitRequest Commit { get; init; }

        public int[]? PendingExtents { get; init; }

        /// <summary>Request payload (write data), pooled; returned when the job is done.</summary>
        public byte[]? Buffer { get; init; }

        public long BudgetBytes { get; init; }

        /// <summary>
        /// Small block reads and writes (at most <see cref="InlineMaxBytes"/>); not flushes or repair
        /// steps, which can block for a long time, and not large transfers, which run faster on the IO
        /// threads in parallel while the receive loop takes in the next frames.
        /// </summary>
        public override bool MayRunInline => header.Type is MessageType.Read or MessageType.Write && BlockBytes() <= InlineMaxBytes;

        /// <summary>Run by the connection's receive loop: its reply joins the loop's batch.</summary>
        public bool Inline { get; set; }

        public override void Execute()
        {
            try
            {
                Run();
            }
            catch (Exception e) when (IoErrors.IsIoFailure(e))
            {
                int errno = IoErrors.Errno(e);
                ResultCode code = IoErrors.Result(errno);
                // One key per (errno, op): a full disk is one first line plus one summary line per interval,
                // not one per job — and not one per extent either (incident suite, diskfull: keyed by extent,
                // a 64-extent region logged 158 lines in 5 s). The first occurrence names its extent.
                string key = $"{Errnos.Name(errno)} {Verb()}";
                connection._host.Throttle.Report(LogLevel.Warning, key, () => $"extent {FirstExtent()}, job {header.JobId}: {e.Message}");
                _failed = true;
                Reply(ErrorBody.Encode(Messages.ReplyTo(header.Type), header.JobId, code, errno, e.Message), null);
            }
            catch (Exception e)
            {
                // A bug or a request no check foresaw: answer this job Invalid and keep serving. An
                // exception escaping here would end the IO thread, and with it the process.
                connection._host.Throttle.Report(LogLevel.Error, $"unexpected error {Verb()}", () => $"job {header.JobId} ({header.Type}): {e}");
                if (!_replied)
                {
                    _failed = true;
                    Reply(ErrorBody.Encode(Messages.ReplyTo(header.Type), header.JobId, ResultCode.Invalid, 0, $"request failed: {e.Message}"), null);
                }
            }
            finally
            {
                DownstairsMetrics.Record(header.Type, !_failed, BlockBytes(), _arrived);
                if (Buffer is not null)
                {
                    ArrayPool<byte>.Shared.Return(Buffer);
                }
            }
        }

        private void Run()
        {
            Storage.Region region = connection.Region;
            int bs = region.Geometry.BlockSize;
            if (access != JobAccess.Read && header.Type != MessageType.ExtentWrite && Refused())
            {
                return;
            }
            switch (header.Type)
            {
                case MessageType.Write:
                {
                    int hashBytes = Range.BlockCount * Wire.HashSize;
                    ReadOnlySpan<byte> hashes = Buffer.AsSpan(0, hashBytes);
                    ReadOnlyMemory<byte> data = Buffer.AsMemory(hashBytes, Range.BlockCount * bs);
                    for (int i = 0; i < Range.BlockCount; i++)
                    {
                        ulong expected = BinaryPrimitives.ReadUInt64LittleEndian(hashes[(i * Wire.HashSize)..]);
                        if (BlockContext.Hash(data.Span.Slice(i * bs, bs)) != expected)
                        {
                            ReplyError(ResultCode.HashMismatch, $"block {Range.FirstBlock + i} does not match the hash sent with it; nothing written");
                            return;
                        }
                    }
                    region.Write(Range, hashes, data, header.JobId);
                    Reply(OutgoingFrame.Create(MessageType.WriteReply, ResultCode.Ok, header.JobId), null);
                    return;
                }
                case MessageType.Read:
                {
                    int hashBytes = Range.BlockCount * Wire.HashSize;
                    int total = hashBytes + (Range.BlockCount * bs);
                    byte[] reply = ArrayPool<byte>.Shared.Rent(total);
                    try
                    {
                        region.Read(Range, reply.AsSpan(0, hashBytes), reply.AsSpan(hashBytes, Range.BlockCount * bs));
                    }
                    catch
                    {
                        ArrayPool<byte>.Shared.Return(reply);
                        throw;
                    }
                    Reply(OutgoingFrame.Create(MessageType.ReadReply, ResultCode.Ok, header.JobId, 8, Range.BlockCount, static (d, n) =>
                    {
                        BinaryPrimitives.WriteInt32LittleEndian(d, n);
                        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], 0);
                    }, reply.AsMemory(0, total)), reply);
                    return;
                }
                case MessageType.Flush:
                    region.Flush(Flush.FlushNumber, connection.Generation);
                    Reply(OutgoingFrame.Create(MessageType.FlushReply, ResultCode.Ok, header.JobId), null);
                    return;
                case MessageType.ExtentRead:
                {
                    int ctxBytes = Extent.BlockCount * BlockContext.Size;
                    int total = ctxBytes + (Extent.BlockCount * bs);
                    byte[] reply = ArrayPool<byte>.Shared.Rent(total);
                    ExtentMeta meta;
                    try
                    {
                        meta = region.ReadExtent(Extent, reply.AsSpan(0, ctxBytes), reply.AsSpan(ctxBytes, Extent.BlockCount * bs));
                    }
                    catch
                    {
                        ArrayPool<byte>.Shared.Return(reply);
                        throw;
                    }
                    Reply(OutgoingFrame.Create(MessageType.ExtentReadReply, ResultCode.Ok, header.JobId, 24, (meta, Extent.BlockCount), static (d, s) =>
                    {
                        BinaryPrimitives.WriteUInt64LittleEndian(d, s.meta.Generation);
                        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], s.meta.FlushNumber);
                        BinaryPrimitives.WriteUInt32LittleEndian(d[16..], s.meta.Dirty ? ExtentMeta.DirtyFlag : 0);
                        BinaryPrimitives.WriteInt32LittleEndian(d[20..], s.BlockCount);
                    }, reply.AsMemory(0, total)), reply);
                    return;
                }
                case MessageType.ExtentWrite:
                {
                    if (Refused())
                    {
                        return;
                    }
                    int ctxBytes = Extent.BlockCount * BlockContext.Size;
                    if (Extent.InPlace)
                    {
                        region.WriteInPlace(Extent, Buffer.AsSpan(0, ctxBytes), Buffer.AsSpan(ctxBytes, Extent.BlockCount * bs));
                    }
                    else
                    {
                        region.WriteStaging(Extent, Buffer.AsSpan(0, ctxBytes), Buffer.AsSpan(ctxBytes, Extent.BlockCount * bs));
                    }
                    Reply(OutgoingFrame.Create(MessageType.ExtentWriteReply, ResultCode.Ok, header.JobId), null);
                    return;
                }
                case MessageType.ExtentCommit:
                    if (Commit.InPlace)
                    {
                        region.CommitInPlace(Commit.Extent, Commit.Meta);
                    }
                    else
                    {
                        region.CommitStaging(Commit.Extent, Commit.Meta);
                    }
                    Reply(OutgoingFrame.Create(MessageType.ExtentCommitReply, ResultCode.Ok, header.JobId), null);
                    return;
                case MessageType.ExtentsPending:
                    region.MarkRepairPending(PendingExtents!);
                    Reply(OutgoingFrame.Create(MessageType.ExtentsPendingReply, ResultCode.Ok, header.JobId), null);
                    return;
                default:
                    ReplyError(ResultCode.Invalid, $"{header.Type} cannot be a job");
                    return;
            }
        }

        /// <summary>Write-type ops need a read-write connection that still holds the fence.</summary>
        private bool Refused()
        {
            if (connection.ReadOnly)
            {
                ReplyError(ResultCode.ReadOnly, "this connection negotiated read-only");
                return true;
            }
            if (connection.IsFenced)
            {
                ReplyError(ResultCode.Fenced, $"generation {connection.Generation} has been superseded by generation {connection.Region.HighestGeneration}");
                return true;
            }
            return false;
        }

        private string Verb() => header.Type switch
        {
            MessageType.Write => "writing",
            MessageType.Read => "reading",
            MessageType.Flush => "flushing",
            MessageType.ExtentRead => "repair-reading",
            _ => "repairing",
        };

        private long FirstExtent() => header.Type switch
        {
            MessageType.Write or MessageType.Read => Range.FirstBlock / connection.Region.Geometry.ExtentBlocks,
            MessageType.ExtentRead or MessageType.ExtentWrite => Extent.Extent,
            MessageType.ExtentCommit => Commit.Extent,
            _ => -1,
        };

        private void ReplyError(ResultCode code, string message)
        {
            _failed = true;
            Reply(ErrorBody.Encode(Messages.ReplyTo(header.Type), header.JobId, code, 0, message), null);
        }

        private long BlockBytes() => header.Type switch
        {
            MessageType.Write or MessageType.Read => (long)Range.BlockCount * connection.Region.Geometry.BlockSize,
            MessageType.ExtentRead or MessageType.ExtentWrite => (long)Extent.BlockCount * connection.Region.Geometry.BlockSize,
            _ => 0,
        };

        private void Reply(OutgoingFrame frame, byte[]? pooled)
        {
            _replied = true;
            connection.Send(frame, BudgetBytes, pooled, Inline);
        }
    }
}
