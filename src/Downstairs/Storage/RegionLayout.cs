using System.Buffers.Binary;
using System.IO.Hashing;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Storage;

/// <summary>Shape of a region: fixed at create time, never changed.</summary>
internal sealed record RegionGeometry(int BlockSize, int ExtentBlocks, int ExtentCount)
{
    public long BlockCount => (long)ExtentBlocks * ExtentCount;

    public long SizeBytes => BlockCount * BlockSize;

    public long ExtentDataBytes => (long)ExtentBlocks * BlockSize;

    /// <summary>Extent file: the blocks, then one 16-byte context per block.</summary>
    public long ExtentFileBytes => ExtentDataBytes + ((long)ExtentBlocks * BlockContext.Size);

    public long ContextOffset(int blockInExtent) => ExtentDataBytes + ((long)blockInExtent * BlockContext.Size);
}

/// <summary>
/// The files of a region directory and the binary layout of <c>region.meta</c>.
/// </summary>
/// <remarks>
/// <code>
/// DIR/region.meta        header (4096 bytes) + 2 record slots × 32 bytes per extent
/// DIR/region.lock        held (flock) by the serving process: one downstairs per region
/// DIR/extents/e000000.dat  blocks (extent blocks × block size), then contexts (16 bytes per block)
/// DIR/extents/e000000.dat.repair  staging copy during live repair (deleted at open)
///
/// header:   0 magic "NBDREGN\0" | 8 format version u32 | 12 header size u32 | 16 uuid[16]
///          32 block size u32 | 36 blocks per extent u32 | 40 extent count u32 | 44 flags u32
///          48 reserved u64 | 56 XxHash64 of bytes 0..56
/// state slots at 512 and 1024 (highest generation seen):
///           seq u64 | highest generation u64 | reserved u64 | XxHash64 of the first 24 bytes
/// boot slots at 1536 and 2048 (the machine boot in which the region was last opened read-write):
///           seq u64 | Linux boot id [16] | XxHash64 of the first 24 bytes
/// extent record slot s of extent i at 4096 + 64 i + 32 s:
///           seq u64 | generation u64 | flush number u64 | flags u32 (bit 0 dirty, bit 1 uncertain) | low 32 bits of XxHash64 of the first 28
/// </code>
/// Why two slots per record: a record update must be atomic, and a 32-byte write is not promised
/// to be (torn sectors, a crash mid-write). We write the slot not in use with a higher sequence
/// number and a checksum; on open the valid slot with the highest sequence wins, so a torn update
/// leaves the previous state, never garbage. The same trick keeps the generation fence and the boot
/// id durable.
/// <para>The boot slots and the uncertain bit came later within format version 1: a region written
/// before them has zeroes in both boot slots (read as "boot unknown") and never sets bit 1, so it
/// opens as it is; an older binary ignores both (it reads only bit 0 and never looks at 1536..2080),
/// and so forgets uncertain marks if it writes the record.</para>
/// </remarks>
internal static class RegionLayout
{
    public const string MetaFileName = "region.meta";
    public const string LockFileName = "region.lock";
    public const string ExtentDirName = "extents";
    public const string StagingSuffix = ".repair";

    public const ulong Magic = 0x004E47455244424E; // "NBDREGN\0" as little-endian bytes
    public const uint FormatVersion = 1;
    public const int HeaderSize = 4096;
    public const int HeaderChecksummedBytes = 56;
    public const int StateSlotOffsetA = 512;
    public const int StateSlotOffsetB = 1024;
    public const int StateSlotSize = 32;
    public const int BootSlotOffsetA = 1536;
    public const int BootSlotOffsetB = 2048;
    public const int BootSlotSize = 32;
    public const int RecordSlotSize = 32;
    public const int RecordsPerExtent = 2;
    public const uint PreallocatedFlag = 1;
    public const uint RecordDirtyFlag = 1;
    public const uint RecordUncertainFlag = 2;

    /// <summary>Limits that keep a corrupt header from making us allocate absurd tables (the wire's: a Hello reply announces them).</summary>
    public const int MaxExtentCount = Wire.MaxExtentCount;
    public const int MaxExtentBlocks = Wire.MaxExtentBlocks;

    public static string MetaPath(string dir) => Path.Combine(dir, MetaFileName);

    public static string ExtentPath(string dir, int extent) => Path.Combine(dir, ExtentDirName, $"e{extent:D6}.dat");

    public static long MetaFileBytes(int extentCount) => HeaderSize + ((long)extentCount * RecordsPerExtent * RecordSlotSize);

    public static long RecordOffset(int extent, int slot) => HeaderSize + ((long)extent * RecordsPerExtent * RecordSlotSize) + ((long)slot * RecordSlotSize);

    public static void WriteRecord(Span<byte> d, ulong seq, ulong generation, ulong flush, bool dirty, bool uncertain = false)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(d, seq);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], generation);
        BinaryPrimitives.WriteUInt64LittleEndian(d[16..], flush);
        BinaryPrimitives.WriteUInt32LittleEndian(d[24..], (dirty ? RecordDirtyFlag : 0) | (uncertain ? RecordUncertainFlag : 0));
        BinaryPrimitives.WriteUInt32LittleEndian(d[28..], (uint)XxHash64.HashToUInt64(d[..28]));
    }

    /// <summary>Null when the slot is empty or torn.</summary>
    public static (ulong Seq, ulong Generation, ulong Flush, bool Dirty, bool Uncertain)? ReadRecord(ReadOnlySpan<byte> s)
    {
        if (BinaryPrimitives.ReadUInt32LittleEndian(s[28..]) != (uint)XxHash64.HashToUInt64(s[..28]) || BinaryPrimitives.ReadUInt64LittleEndian(s) == 0)
        {
            return null;
        }
        uint flags = BinaryPrimitives.ReadUInt32LittleEndian(s[24..]);
        return (BinaryPrimitives.ReadUInt64LittleEndian(s), BinaryPrimitives.ReadUInt64LittleEndian(s[8..]),
            BinaryPrimitives.ReadUInt64LittleEndian(s[16..]), (flags & RecordDirtyFlag) != 0, (flags & RecordUncertainFlag) != 0);
    }

    public static void WriteBootSlot(Span<byte> d, ulong seq, Guid bootId)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(d, seq);
        bootId.TryWriteBytes(d[8..24], bigEndian: true, out _);
        BinaryPrimitives.WriteUInt64LittleEndian(d[24..], XxHash64.HashToUInt64(d[..24]));
    }

    /// <summary>Null when the slot is empty (a region from before boot ids were recorded) or torn.</summary>
    public static (ulong Seq, Guid BootId)? ReadBootSlot(ReadOnlySpan<byte> s)
    {
        if (BinaryPrimitives.ReadUInt64LittleEndian(s[24..]) != XxHash64.HashToUInt64(s[..24]) || BinaryPrimitives.ReadUInt64LittleEndian(s) == 0)
        {
            return null;
        }
        return (BinaryPrimitives.ReadUInt64LittleEndian(s), new Guid(s[8..24], bigEndian: true));
    }

    public static void WriteStateSlot(Span<byte> d, ulong seq, ulong highestGeneration)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(d, seq);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], highestGeneration);
        BinaryPrimitives.WriteUInt64LittleEndian(d[16..], 0);
        BinaryPrimitives.WriteUInt64LittleEndian(d[24..], XxHash64.HashToUInt64(d[..24]));
    }

    public static (ulong Seq, ulong HighestGeneration)? ReadStateSlot(ReadOnlySpan<byte> s)
    {
        if (BinaryPrimitives.ReadUInt64LittleEndian(s[24..]) != XxHash64.HashToUInt64(s[..24]) || BinaryPrimitives.ReadUInt64LittleEndian(s) == 0)
        {
            return null;
        }
        return (BinaryPrimitives.ReadUInt64LittleEndian(s), BinaryPrimitives.ReadUInt64LittleEndian(s[8..]));
    }

    public static byte[] BuildHeader(Guid uuid, RegionGeometry g, bool preallocated)
    {
        byte[] h = new byte[HeaderSize];
        BinaryPrimitives.WriteUInt64LittleEndian(h, Magic);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(8), FormatVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(12), HeaderSize);
        uuid.TryWriteBytes(h.AsSpan(16), bigEndian: true, out _);
        BinaryPrimitives.WriteInt32LittleEndian(h.AsSpan(32), g.BlockSize);
        BinaryPrimitives.WriteInt32LittleEndian(h.AsSpan(36), g.ExtentBlocks);
        BinaryPrimitives.WriteInt32LittleEndian(h.AsSpan(40), g.ExtentCount);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(44), preallocated ? PreallocatedFlag : 0);
        BinaryPrimitives.WriteUInt64LittleEndian(h.AsSpan(56), XxHash64.HashToUInt64(h.AsSpan(0, HeaderChecksummedBytes)));
        WriteStateSlot(h.AsSpan(StateSlotOffsetA, StateSlotSize), 1, 0);
        return h;
    }
}

/// <summary>A region that cannot be opened as it is; names the file at fault. Nothing was changed on disk.</summary>
internal sealed class RegionDamagedException(string path, string problem)
    : IOException($"{path}: {problem}")
{
    public string FilePath { get; } = path;
}
