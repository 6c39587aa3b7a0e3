using System.Buffers;
using System.Buffers.Binary;
using System.Text;

namespace NbdServer.Protocol;

/// <summary>
/// Per-extent state the engine compares replicas by (DESIGN §3 "Flush numbers"):
/// <c>generation u64 | flush u64 | flags u32 (bit 0 dirty, bit 1 uncertain) | reserved u32</c>.
/// </summary>
/// <param name="Uncertain">
/// The downstairs cannot vouch for the blocks written since the extent's last flush: the machine
/// restarted while it was dirty (unsynced writes may be gone) or an fdatasync failed (the kernel
/// dropped the pages). Such an extent is copied whole; a changed-block record cannot cover it.
/// </param>
public readonly record struct ExtentMeta(ulong Generation, ulong FlushNumber, bool Dirty, bool Uncertain = false)
{
    public const int WireSize = 24;
    public const uint DirtyFlag = 1;
    public const uint UncertainFlag = 2;

    public uint Flags => (Dirty ? DirtyFlag : 0) | (Uncertain ? UncertainFlag : 0);

    public void Write(Span<byte> d)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(d, Generation);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], FlushNumber);
        BinaryPrimitives.WriteUInt32LittleEndian(d[16..], Flags);
        BinaryPrimitives.WriteUInt32LittleEndian(d[20..], 0);
    }

    public static ExtentMeta Read(ref BodyReader r)
    {
        ulong gen = r.ReadUInt64();
        ulong flush = r.ReadUInt64();
        uint flags = r.ReadUInt32();
        r.ReadUInt32();
        return new ExtentMeta(gen, flush, (flags & DirtyFlag) != 0, (flags & UncertainFlag) != 0);
    }
}

/// <summary>
/// Hello (client → downstairs), job id 0, body 64 bytes:
/// <code>
///  version u32 | flags u32 (bit 0 read-only) | region uuid [16] (all zero: any region)
///  upstairs id [16] | session id [16] | generation u64
/// </code>
/// </summary>
public readonly record struct HelloRequest(uint Version, bool ReadOnly, Guid RegionId, Guid UpstairsId, Guid SessionId, ulong Generation)
{
    public const int BodySize = 64;
    public const uint ReadOnlyFlag = 1;

    public OutgoingFrame Encode() => OutgoingFrame.Create(MessageType.Hello, ResultCode.Ok, 0, BodySize, this, static (d, h) =>
    {
        BinaryPrimitives.WriteUInt32LittleEndian(d, h.Version);
        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], h.ReadOnly ? ReadOnlyFlag : 0);
        h.RegionId.TryWriteBytes(d[8..], bigEndian: true, out _);
        h.UpstairsId.TryWriteBytes(d[24..], bigEndian: true, out _);
        h.SessionId.TryWriteBytes(d[40..], bigEndian: true, out _);
        BinaryPrimitives.WriteUInt64LittleEndian(d[56..], h.Generation);
    });

    public static HelloRequest Parse(ReadOnlySequence<byte> body)
    {
        Messages.ExpectLength(body, BodySize, "Hello");
        var r = new BodyReader(body);
        uint version = r.ReadUInt32();
        uint flags = r.ReadUInt32();
        return new HelloRequest(version, (flags & ReadOnlyFlag) != 0, r.ReadGuid(), r.ReadGuid(), r.ReadGuid(), r.ReadUInt64());
    }
}

/// <summary>
/// Hello reply, body 56 + 24 × extent count bytes:
/// <code>
///  version u32 | flags u32 | region uuid [16] | block size u32 | blocks per extent u32
///  extent count u32 | max frame body u32 | max jobs in flight u32 | reserved u32
///  highest generation seen u64 | extent count × (generation u64, flush u64, flags u32, rsvd u32)
/// </code>
/// </summary>
public sealed record HelloReply(uint Version, bool ReadOnly, Guid RegionId, int BlockSize, int ExtentBlocks, int ExtentCount,
    int MaxFrameBytes, int MaxJobs, ulong HighestGeneration, ExtentMeta[] Extents)
{
    public const int FixedSize = 56;

    public long RegionBytes => (long)BlockSize * ExtentBlocks * ExtentCount;

    public long BlockCount => (long)ExtentBlocks * ExtentCount;

    public OutgoingFrame Encode() => OutgoingFrame.Create(MessageType.HelloReply, ResultCode.Ok, 0, FixedSize + (ExtentMeta.WireSize * Extents.Length), this, static (d, h) =>
    {
        BinaryPrimitives.WriteUInt32LittleEndian(d, h.Version);
        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], h.ReadOnly ? HelloRequest.ReadOnlyFlag : 0);
        h.RegionId.TryWriteBytes(d[8..], bigEndian: true, out _);
        BinaryPrimitives.WriteInt32LittleEndian(d[24..], h.BlockSize);
        BinaryPrimitives.WriteInt32LittleEndian(d[28..], h.ExtentBlocks);
        BinaryPrimitives.WriteInt32LittleEndian(d[32..], h.ExtentCount);
        BinaryPrimitives.WriteInt32LittleEndian(d[36..], h.MaxFrameBytes);
        BinaryPrimitives.WriteInt32LittleEndian(d[40..], h.MaxJobs);
        BinaryPrimitives.WriteUInt32LittleEndian(d[44..], 0);
        BinaryPrimitives.WriteUInt64LittleEndian(d[48..], h.HighestGeneration);
        for (int i = 0; i < h.Extents.Length; i++)
        {
            h.Extents[i].Write(d[(FixedSize + (i * ExtentMeta.WireSize))..]);
        }
    });

    public static HelloReply Parse(ReadOnlySequence<byte> body)
    {
        var r = new BodyReader(body);
        uint version = r.ReadUInt32();
        uint flags = r.ReadUInt32();
        Guid region = r.ReadGuid();
        int blockSize = r.ReadInt32();
        int extentBlocks = r.ReadInt32();
        int extentCount = r.ReadInt32();
        int maxFrame = r.ReadInt32();
        int maxJobs = r.ReadInt32();
        r.ReadUInt32();
        ulong highest = r.ReadUInt64();
        // Checked against the body length before anything is allocated by this peer-supplied count.
        if (extentCount < 0 || extentCount > Wire.MaxExtentCount || r.Remaining != (long)extentCount * ExtentMeta.WireSize)
        {
            throw new DownstairsProtocolException($"Hello reply announces {extentCount} extents but carries {r.Remaining} bytes of extent state");
        }
        var extents = new ExtentMeta[extentCount];
        for (int i = 0; i < extentCount; i++)
        {
            extents[i] = ExtentMeta.Read(ref r);
            // A real region's highest generation covers every extent's (it is computed from them at open).
            if (extents[i].Generation > highest)
            {
                throw new DownstairsProtocolException($"misbehaving replica: extent {i} has generation {extents[i].Generation}, above the highest generation {highest} it reports");
            }
        }
        var reply = new HelloReply(version, (flags & HelloRequest.ReadOnlyFlag) != 0, region, blockSize, extentBlocks, extentCount, maxFrame, maxJobs, highest, extents);
        reply.Validate();
        return reply;
    }

    /// <summary>
    /// Refuses a reply no honest downstairs sends, before anything is sized or computed from it: the
    /// engine starts at highest generation + 1, so a replica reporting 2^64 − 1 would make that 0.
    /// </summary>
    /// <exception cref="DownstairsProtocolException">The replica is misbehaving; do not use it.</exception>
    public void Validate()
    {
        if (Version != Wire.ProtocolVersion)
        {
            throw new DownstairsProtocolException($"misbehaving replica: its Hello reply is for protocol version {Version}, not {Wire.ProtocolVersion}");
        }
        if (BlockSize is not (512 or 4096))
        {
            throw new DownstairsProtocolException($"misbehaving replica: block size {BlockSize} (only 512 and 4096 exist)");
        }
        if (ExtentBlocks is <= 0 or > Wire.MaxExtentBlocks)
        {
            throw new DownstairsProtocolException($"misbehaving replica: {ExtentBlocks} blocks per extent (1 to {Wire.MaxExtentBlocks})");
        }
        // Both at most 2^20, so blocks × block size stays far below 2^63: RegionBytes cannot overflow.
        if (ExtentCount is <= 0 or > Wire.MaxExtentCount || Extents.Length != ExtentCount)
        {
            throw new DownstairsProtocolException($"misbehaving replica: {ExtentCount} extents announced, {Extents.Length} described (1 to {Wire.MaxExtentCount})");
        }
        if (MaxFrameBytes is < Wire.MinMaxFrameBytes or > Wire.MaxMaxFrameBytes)
        {
            throw new DownstairsProtocolException($"misbehaving replica: max frame {MaxFrameBytes} bytes ({Wire.MinMaxFrameBytes} to {Wire.MaxMaxFrameBytes})");
        }
        if (MaxJobs is < 1 or > Wire.MaxJobsLimit)
        {
            throw new DownstairsProtocolException($"misbehaving replica: {MaxJobs} jobs in flight allowed (1 to {Wire.MaxJobsLimit})");
        }
        if (HighestGeneration >= Wire.MaxGeneration)
        {
            throw new DownstairsProtocolException($"misbehaving replica: it reports highest generation {HighestGeneration}, at or above the maximum {Wire.MaxGeneration}");
        }
        foreach (ExtentMeta m in Extents)
        {
            // Strict: the upstairs adds one to the highest it finds, and the ceiling itself is never a valid flush number.
            if (m.FlushNumber >= Wire.MaxFlushNumber)
            {
                throw new DownstairsProtocolException($"misbehaving replica: it reports flush number {m.FlushNumber}, at or above the ceiling {Wire.MaxFlushNumber}");
            }
        }
    }
}

/// <summary>
/// Write: <c>first block u64 | block count u32 | reserved u32 | count × hash u64 | count × block</c>.
/// Read: <c>first block u64 | block count u32 | reserved u32</c> (no payload).
/// </summary>
public readonly record struct BlockRange(long FirstBlock, int BlockCount)
{
    public const int FixedSize = 16;

    /// <summary>One past the last block; only meaningful once <see cref="IsWithin"/> held (it cannot overflow then).</summary>
    public long EndBlock => FirstBlock + BlockCount;

    /// <summary>
    /// True when every block lies in [0, <paramref name="blockCount"/>). Written without adding first and
    /// count: a peer-chosen first block near 2^63 would make that sum wrap negative and pass.
    /// </summary>
    public bool IsWithin(long blockCount) => FirstBlock >= 0 && BlockCount > 0 && BlockCount <= blockCount && FirstBlock <= blockCount - BlockCount;

    public void Write(Span<byte> d)
    {
        BinaryPrimitives.WriteInt64LittleEndian(d, FirstBlock);
        BinaryPrimitives.WriteInt32LittleEndian(d[8..], BlockCount);
        BinaryPrimitives.WriteUInt32LittleEndian(d[12..], 0);
    }

    public static BlockRange Read(ref BodyReader r, string what)
    {
        long first = (long)r.ReadUInt64();
        int count = r.ReadInt32();
        r.ReadUInt32();
        if (first < 0 || count <= 0)
        {
            throw new DownstairsProtocolException($"{what}: block range (first {first}, count {count}) is not a range");
        }
        return new BlockRange(first, count);
    }
}

/// <summary>Flush: <c>flush number u64 | generation u64</c>.</summary>
public readonly record struct FlushRequest(ulong FlushNumber, ulong Generation)
{
    public const int BodySize = 16;
}

/// <summary>
/// Repair ops address blocks inside one extent: <c>extent u32 | first block in extent u32 | count u32 | flags u32</c>.
/// ExtentRead reply: <c>generation u64 | flush u64 | flags u32 | count u32 | count × context(16) | count × block</c>.
/// ExtentWrite: the range, then <c>count × context(16) | count × block</c>; flag bit 0 ("begin") discards any earlier staging copy;
/// flag bit 1 ("in place") writes into the live extent instead of the staging copy (a catch-up from the changed-block record).
/// ExtentCommit: <c>extent u32 | flags u32 (bit 0 dirty, bit 1 in place) | generation u64 | flush u64</c>.
/// </summary>
public readonly record struct ExtentRange(int Extent, int FirstBlock, int BlockCount, uint Flags = 0)
{
    public const int FixedSize = 16;
    public const uint BeginFlag = 1;
    public const uint InPlaceFlag = 2;
    public const uint KnownFlags = BeginFlag | InPlaceFlag;

    public bool Begin => (Flags & BeginFlag) != 0;

    public bool InPlace => (Flags & InPlaceFlag) != 0;

    /// <summary>True when the extent exists and the blocks lie inside it (no first + count sum: see <see cref="BlockRange.IsWithin"/>).</summary>
    public bool IsWithin(int extentCount, int extentBlocks) =>
        Extent >= 0 && Extent < extentCount && FirstBlock >= 0 && BlockCount > 0 && BlockCount <= extentBlocks && FirstBlock <= extentBlocks - BlockCount;

    public void Write(Span<byte> d)
    {
        BinaryPrimitives.WriteInt32LittleEndian(d, Extent);
        BinaryPrimitives.WriteInt32LittleEndian(d[4..], FirstBlock);
        BinaryPrimitives.WriteInt32LittleEndian(d[8..], BlockCount);
        BinaryPrimitives.WriteUInt32LittleEndian(d[12..], Flags);
    }

    public static ExtentRange Read(ref BodyReader r, string what)
    {
        int extent = r.ReadInt32();
        int first = r.ReadInt32();
        int count = r.ReadInt32();
        uint flags = r.ReadUInt32();
        if (extent < 0 || first < 0 || count <= 0)
        {
            throw new DownstairsProtocolException($"{what}: extent range (extent {extent}, first {first}, count {count}) is not a range");
        }
        return new ExtentRange(extent, first, count, flags);
    }
}

/// <param name="InPlace">
/// The changed blocks were written into the live extent with ordinary writes (a catch-up repair from
/// the engine's changed-block record), not staged: the commit makes the extent file durable and
/// records <see cref="Meta"/>, with no staging file to rename. Refused for a poisoned extent.
/// </param>
public readonly record struct ExtentCommitRequest(int Extent, ExtentMeta Meta, bool InPlace = false)
{
    public const int BodySize = 24;
    public const uint DirtyFlag = ExtentMeta.DirtyFlag;
    public const uint InPlaceFlag = 2;
    public const uint KnownFlags = DirtyFlag | InPlaceFlag;

    public uint Flags => (Meta.Dirty ? DirtyFlag : 0) | (InPlace ? InPlaceFlag : 0);
}

/// <summary>
/// ExtentsPending: <c>count u32 | count × extent u32</c>. Sent by the engine when a live repair
/// starts, before any other job of that repair: these extents hold stale data until their copy is
/// committed, so until then a flush must not stamp them current (nor refuse because one is poisoned).
/// </summary>
public static class ExtentsPendingRequest
{
    public const int HeaderSize = 4;

    public static int BodySize(int count) => HeaderSize + (4 * count);

    public static void Write(Span<byte> d, IReadOnlyList<int> extents)
    {
        BinaryPrimitives.WriteInt32LittleEndian(d, extents.Count);
        for (int i = 0; i < extents.Count; i++)
        {
            BinaryPrimitives.WriteInt32LittleEndian(d[(HeaderSize + (4 * i))..], extents[i]);
        }
    }

    /// <summary>The extents listed; each must be below <paramref name="extentCount"/>.</summary>
    public static int[] Read(ref BodyReader r, long bodyLength, int extentCount)
    {
        int count = r.ReadInt32();
        if (count < 0 || count > extentCount || bodyLength != BodySize(count))
        {
            throw new DownstairsProtocolException($"ExtentsPending: {count} extents in a {bodyLength}-byte body (region has {extentCount} extents)");
        }
        var extents = new int[count];
        for (int i = 0; i < count; i++)
        {
            extents[i] = r.ReadInt32();
            if (extents[i] < 0 || extents[i] >= extentCount)
            {
                throw new DownstairsProtocolException($"ExtentsPending: extent {extents[i]} is beyond the region's {extentCount} extents");
            }
        }
        return extents;
    }
}

/// <summary>Body of every reply whose result is not Ok: <c>errno i32 | message UTF-8</c>.</summary>
public readonly record struct ErrorBody(int Errno, string Message)
{
    public static OutgoingFrame Encode(MessageType replyType, ulong jobId, ResultCode code, int errno, string message)
    {
        byte[] text = Encoding.UTF8.GetBytes(message.Length > Wire.MaxErrorMessageBytes / 4 * 3 ? message[..(Wire.MaxErrorMessageBytes / 4 * 3)] : message);
        int length = Math.Min(text.Length, Wire.MaxErrorMessageBytes);
        return OutgoingFrame.Create(replyType, code, jobId, 4 + length, (errno, text, length), static (d, s) =>
        {
            BinaryPrimitives.WriteInt32LittleEndian(d, s.errno);
            s.text.AsSpan(0, s.length).CopyTo(d[4..]);
        });
    }

    public static ErrorBody Parse(ReadOnlySequence<byte> body)
    {
        if (body.Length < 4 || body.Length > 4 + Wire.MaxErrorMessageBytes)
        {
            throw new DownstairsProtocolException($"error reply body of {body.Length} bytes (expected 4 to {4 + Wire.MaxErrorMessageBytes})");
        }
        var r = new BodyReader(body);
        int errno = r.ReadInt32();
        return new ErrorBody(errno, Encoding.UTF8.GetString(r.Rest));
    }
}

public static class Messages
{
    public static void ExpectLength(ReadOnlySequence<byte> body, long expected, string what)
    {
        if (body.Length != expected)
        {
            throw new DownstairsProtocolException($"{what} body is {body.Length} bytes, expected {expected}");
        }
    }

    public static MessageType ReplyTo(MessageType request) => (MessageType)((ushort)request | Wire.ReplyFlag);
}
