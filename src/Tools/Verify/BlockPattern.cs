using System.Buffers.Binary;
using System.IO.Hashing;

namespace NbdServer.Tools.Verify;

/// <summary>What a block read back turned out to hold.</summary>
internal enum BlockKind
{
    /// <summary>All zeroes: never written (on a fresh device).</summary>
    Zero,
    /// <summary>A whole, self-consistent verifier block for this index and this log's tag.</summary>
    Valid,
    /// <summary>Anything else: torn, bit-rotted, misplaced, from another run, or garbage.</summary>
    Garbage,
}

/// <summary>
/// The content of a verifier block: a header (magic, log tag, block index, write counter), a
/// pseudo-random filler derived from the header, and an XxHash64 of everything before it in the
/// last 8 bytes. A block from another index, another run, a torn write or a flipped bit fails the
/// check; a block whose counter is below what the log says was acknowledged is stale.
/// </summary>
internal static class BlockPattern
{
    public const ulong Magic = 0x3130594656444E42; // "NBDVFY01" little-endian
    private const int HeaderSize = 32;
    public const int MinBlockSize = 512;

    public static void Fill(Span<byte> block, ulong tag, ulong index, ulong counter)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(block, Magic);
        BinaryPrimitives.WriteUInt64LittleEndian(block[8..], tag);
        BinaryPrimitives.WriteUInt64LittleEndian(block[16..], index);
        BinaryPrimitives.WriteUInt64LittleEndian(block[24..], counter);
        ulong x = (tag ^ (index * 0x9E3779B97F4A7C15) ^ (counter * 0xC2B2AE3D27D4EB4F)) | 1;
        int end = block.Length - 8;
        for (int i = HeaderSize; i < end; i += 8)
        {
            // xorshift64: cheap, and different for every (tag, index, counter).
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            BinaryPrimitives.WriteUInt64LittleEndian(block[i..], x);
        }
        BinaryPrimitives.WriteUInt64LittleEndian(block[end..], XxHash64.HashToUInt64(block[..end]));
    }

    /// <summary>Classifies <paramref name="block"/>; for a valid one, <paramref name="counter"/> is its write counter.</summary>
    public static BlockKind Classify(ReadOnlySpan<byte> block, ulong tag, ulong index, out ulong counter)
    {
        counter = 0;
        if (!block.ContainsAnyExcept((byte)0))
        {
            return BlockKind.Zero;
        }
        int end = block.Length - 8;
        if (BinaryPrimitives.ReadUInt64LittleEndian(block) != Magic
            || BinaryPrimitives.ReadUInt64LittleEndian(block[8..]) != tag
            || BinaryPrimitives.ReadUInt64LittleEndian(block[16..]) != index
            || BinaryPrimitives.ReadUInt64LittleEndian(block[end..]) != XxHash64.HashToUInt64(block[..end]))
        {
            return BlockKind.Garbage;
        }
        counter = BinaryPrimitives.ReadUInt64LittleEndian(block[24..]);
        return BlockKind.Valid;
    }
}
