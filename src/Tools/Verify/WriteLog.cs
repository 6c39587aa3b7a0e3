using System.Buffers.Binary;

namespace NbdServer.Tools.Verify;

/// <summary>
/// What the verifier knows about every block of its range. Per block, three write counters:
/// <list type="bullet">
/// <item><c>Acked</c>: the last write the server acknowledged (0: none). Online, a read must return exactly this.</item>
/// <item><c>Issued</c>: the highest counter ever sent. A block holding more was never written by us.</item>
/// <item><c>Flushed</c>: the last write acknowledged before a FLUSH that then succeeded. Nothing, not even
/// a crash, may make a block older than this: that is the "acknowledged-and-flushed write lost" bar.</item>
/// </list>
/// A block is <c>Uncertain</c> when its latest write has no known outcome (an error, a lost connection,
/// or a log reloaded after a crash): then anything in [Flushed, Issued] is acceptable until it is rewritten.
/// Callers serialise IO per block, so no two requests touch one block at once.
/// </summary>
internal sealed class WriteLog
{
    private const ulong FileMagic = 0x31474F4C56444E42; // "NBDVLOG1"
    private const int HeaderSize = 40;

    private readonly uint[] _acked;
    private readonly uint[] _issued;
    private readonly uint[] _flushed;
    private readonly bool[] _uncertain;
    private readonly Lock _lock = new();

    // Acks not yet covered by a completed flush, in ack order: (ack sequence, block, counter).
    private readonly Queue<(long Seq, long Block, uint Counter)> _unflushed = new();
    private long _ackSeq;

    public int BlockSize { get; }
    public long Blocks { get; }
    public ulong Tag { get; }
    public ulong OffsetBytes { get; }

    public WriteLog(int blockSize, long blocks, ulong tag, ulong offsetBytes)
    {
        BlockSize = blockSize;
        Blocks = blocks;
        Tag = tag;
        OffsetBytes = offsetBytes;
        _acked = new uint[blocks];
        _issued = new uint[blocks];
        _flushed = new uint[blocks];
        _uncertain = new bool[blocks];
    }

    public uint Acked(long block) => _acked[block];
    public uint Issued(long block) => _issued[block];
    public uint Flushed(long block) => _flushed[block];
    public bool Uncertain(long block) => _uncertain[block];

    /// <summary>The next counter for <paramref name="block"/>; recorded as issued before the write is sent.</summary>
    public uint BeginWrite(long block)
    {
        lock (_lock)
        {
            return ++_issued[block];
        }
    }

    public void WriteAcked(long block, uint counter)
    {
        lock (_lock)
        {
            _acked[block] = counter;
            _uncertain[block] = false;
            _unflushed.Enqueue((++_ackSeq, block, counter));
        }
    }

    /// <summary>The write's outcome is unknown (error or lost connection): old or new data may be there.</summary>
    public void WriteUnknown(long block)
    {
        lock (_lock)
        {
            _uncertain[block] = true;
        }
    }

    /// <summary>Call when a FLUSH is sent; pass the result to <see cref="FlushCompleted"/> when it succeeds.</summary>
    public long BeginFlush()
    {
        lock (_lock)
        {
            return _ackSeq;
        }
    }

    /// <summary>Every write acknowledged before the flush was sent is now durable.</summary>
    public void FlushCompleted(long seqAtBegin)
    {
        lock (_lock)
        {
            while (_unflushed.TryPeek(out var e) && e.Seq <= seqAtBegin)
            {
                _unflushed.Dequeue();
                if (e.Counter > _flushed[e.Block])
                {
                    _flushed[e.Block] = e.Counter;
                }
            }
        }
    }

    /// <summary>After a crash of the server (or a reload), only flushed data is promised: every block becomes uncertain where it was not flushed.</summary>
    public void ForgetUnflushed()
    {
        lock (_lock)
        {
            for (long b = 0; b < Blocks; b++)
            {
                if (_acked[b] != _flushed[b] || _issued[b] != _acked[b])
                {
                    _uncertain[b] = true;
                }
            }
            _unflushed.Clear();
        }
    }

    /// <summary>Writes the log to <paramref name="path"/> atomically (temp file, fsync, rename).</summary>
    public void Save(string path)
    {
        string temp = path + ".tmp";
        using (var f = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16))
        {
            byte[] header = new byte[HeaderSize];
            BinaryPrimitives.WriteUInt64LittleEndian(header, FileMagic);
            BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(8), BlockSize);
            BinaryPrimitives.WriteInt64LittleEndian(header.AsSpan(16), Blocks);
            BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(24), Tag);
            BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(32), OffsetBytes);
            f.Write(header);
            byte[] rec = new byte[13];
            lock (_lock)
            {
                for (long b = 0; b < Blocks; b++)
                {
                    BinaryPrimitives.WriteUInt32LittleEndian(rec, _acked[b]);
                    BinaryPrimitives.WriteUInt32LittleEndian(rec.AsSpan(4), _issued[b]);
                    BinaryPrimitives.WriteUInt32LittleEndian(rec.AsSpan(8), _flushed[b]);
                    rec[12] = _uncertain[b] ? (byte)1 : (byte)0;
                    f.Write(rec);
                }
            }
            f.Flush(flushToDisk: true);
        }
        File.Move(temp, path, overwrite: true);
    }

    public static WriteLog Load(string path)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        byte[] header = new byte[HeaderSize];
        f.ReadExactly(header);
        if (BinaryPrimitives.ReadUInt64LittleEndian(header) != FileMagic)
        {
            throw new InvalidDataException($"{path} is not a verifier write log");
        }
        var log = new WriteLog(
            BinaryPrimitives.ReadInt32LittleEndian(header.AsSpan(8)),
            BinaryPrimitives.ReadInt64LittleEndian(header.AsSpan(16)),
            BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(24)),
            BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(32)));
        byte[] rec = new byte[13];
        for (long b = 0; b < log.Blocks; b++)
        {
            f.ReadExactly(rec);
            log._acked[b] = BinaryPrimitives.ReadUInt32LittleEndian(rec);
            log._issued[b] = BinaryPrimitives.ReadUInt32LittleEndian(rec.AsSpan(4));
            log._flushed[b] = BinaryPrimitives.ReadUInt32LittleEndian(rec.AsSpan(8));
            log._uncertain[b] = rec[12] != 0;
        }
        return log;
    }
}
