using System.Buffers.Binary;
using System.IO.Hashing;

namespace NbdServer.Protocol;

/// <summary>
/// Per-block context, 16 bytes, stored after the extent's blocks and sent by repair ops:
/// <c>hash u64 (XxHash3 of the block; 0 = never written) | write id u64 (job id of the last write)</c>.
/// </summary>
/// <remarks>
/// The hash is what catches a torn block: data and context are written separately, so a crash
/// between them leaves a block whose data does not match its hash, which every read reports.
/// </remarks>
public static class BlockContext
{
    public const int Size = 16;

    /// <summary>XxHash3 of one block, never 0 (0 marks a block that was never written).</summary>
    public static ulong Hash(ReadOnlySpan<byte> block)
    {
        ulong h = XxHash3.HashToUInt64(block);
        return h == 0 ? 1 : h;
    }

    /// <summary>Fills <paramref name="hashes"/> (8 bytes per block, little-endian) for consecutive blocks.</summary>
    public static void HashBlocks(ReadOnlySpan<byte> data, int blockSize, Span<byte> hashes)
    {
        int count = data.Length / blockSize;
        for (int i = 0; i < count; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(hashes[(i * 8)..], Hash(data.Slice(i * blockSize, blockSize)));
        }
    }

    /// <summary>True when <paramref name="block"/> matches <paramref name="storedHash"/> (hash 0: must be all zeroes).</summary>
    public static bool Verify(ReadOnlySpan<byte> block, ulong storedHash) =>
        storedHash == 0 ? !block.ContainsAnyExcept((byte)0) : Hash(block) == storedHash;
}
