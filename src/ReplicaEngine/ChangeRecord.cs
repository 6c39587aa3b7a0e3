using System.Numerics;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// What one replica missed while it was out of service: per extent, a bitmap of granules (a few
/// blocks each, <see cref="EngineOptions.ChangeRecordGranuleBytes"/>) written without it. Its
/// catch-up repair copies those granules alone instead of every extent they touched. Owned by the loop.
/// </summary>
/// <remarks>
/// The record is <em>valid</em> from the moment the replica is in service with nothing missing (at
/// activation or at the end of a repair) and stays so through faults and interrupted repairs. It is
/// lost when the upstairs starts (a replica not in service at activation has no record) or when
/// it would mark more than <see cref="EngineOptions.ChangeRecordMaxBytes"/>; the repair then falls
/// back to comparing extents. Memory: one bit per granule of each extent that was written, so at
/// most the region's size / granule / 8 bytes.
/// </remarks>
internal sealed class ChangeRecord
{
    private readonly Dictionary<int, ulong[]> _extents = [];
    private readonly int _extentBlocks;
    private readonly int _granuleBlocks;
    private readonly int _words;
    private readonly long _maxGranules;

    public ChangeRecord(int extentBlocks, int blockSize, int granuleBytes, long maxBytes)
    {
        _extentBlocks = extentBlocks;
        _granuleBlocks = Math.Clamp(granuleBytes / blockSize, 1, extentBlocks);
        GranuleBytes = _granuleBlocks * blockSize;
        _maxGranules = maxBytes / GranuleBytes;
        GranulesPerExtent = (extentBlocks + _granuleBlocks - 1) / _granuleBlocks;
        _words = (GranulesPerExtent + 63) / 64;
        LostReason = "the upstairs started without it in service";
    }

    /// <summary>A record with nothing to record (no geometry yet): always lost.</summary>
    public static ChangeRecord None { get; } = new(1, 1, 1, 0);

    public int GranuleBlocks => _granuleBlocks;

    public int GranuleBytes { get; }

    public int GranulesPerExtent { get; }

    public bool Valid { get; private set; }

    /// <summary>Why the record is not valid (null while it is).</summary>
    public string? LostReason { get; private set; }

    /// <summary>Granules marked.</summary>
    public long Granules { get; private set; }

    public int ExtentCount => _extents.Count;

    public IEnumerable<int> Extents => _extents.Keys;

    /// <summary>The replica holds everything: record from here.</summary>
    public void Start()
    {
        _extents.Clear();
        Granules = 0;
        Valid = _maxGranules > 0;
        LostReason = Valid ? null : "the changed-block record is off (ChangeRecordMaxBytes = 0)";
    }

    public void Lose(string why)
    {
        _extents.Clear();
        Granules = 0;
        Valid = false;
        LostReason = why;
    }

    /// <summary>
    /// Marks blocks written without the replica. False when this mark overflowed the record (it is
    /// lost now; the caller says so once); true otherwise, also when there is no record to mark.
    /// </summary>
    public bool Mark(long firstBlock, int blocks)
    {
        if (!Valid || blocks <= 0)
        {
            return true;
        }
        long end = firstBlock + blocks;
        for (long block = firstBlock; block < end;)
        {
            int extent = (int)(block / _extentBlocks);
            long extentStart = (long)extent * _extentBlocks;
            int from = (int)(block - extentStart);
            int to = (int)Math.Min(end - extentStart, _extentBlocks);
            if (!_extents.TryGetValue(extent, out ulong[]? bits))
            {
                bits = new ulong[_words];
                _extents.Add(extent, bits);
            }
            for (int g = from / _granuleBlocks; g <= (to - 1) / _granuleBlocks; g++)
            {
                ulong bit = 1UL << (g & 63);
                if ((bits[g >> 6] & bit) == 0)
                {
                    bits[g >> 6] |= bit;
                    Granules++;
                }
            }
            block = extentStart + to;
        }
        if (Granules > _maxGranules)
        {
            Lose($"it passed {_maxGranules} granules (ChangeRecordMaxBytes)");
            return false;
        }
        return true;
    }

    public bool Contains(int extent) => _extents.ContainsKey(extent);

    /// <summary>An extent's granules, left in the record (null: none marked).</summary>
    public ulong[]? Peek(int extent) => _extents.GetValueOrDefault(extent);

    /// <summary>Removes and returns an extent's granules (null: none marked), for a copy that starts now.</summary>
    public ulong[]? Take(int extent)
    {
        if (!_extents.Remove(extent, out ulong[]? bits))
        {
            return null;
        }
        Granules -= Count(bits);
        return bits;
    }

    /// <summary>A copy that took <paramref name="bits"/> failed: they are missing again.</summary>
    public void Restore(int extent, ulong[] bits)
    {
        if (!Valid)
        {
            return;
        }
        if (!_extents.TryGetValue(extent, out ulong[]? mine))
        {
            _extents.Add(extent, bits);
            Granules += Count(bits);
            return;
        }
        for (int i = 0; i < mine.Length; i++)
        {
            Granules += BitOperations.PopCount(bits[i] & ~mine[i]);
            mine[i] |= bits[i];
        }
    }

    public static long Count(ulong[] bits)
    {
        long n = 0;
        foreach (ulong word in bits)
        {
            n += BitOperations.PopCount(word);
        }
        return n;
    }

    /// <summary>
    /// The marked granules as block ranges inside the extent (adjacent granules joined, each range at
    /// most <paramref name="maxBlocks"/> blocks), in block order.
    /// </summary>
    public static List<(int FirstBlock, int Count)> Runs(ulong[] bits, int granuleBlocks, int extentBlocks, int maxBlocks)
    {
        var runs = new List<(int, int)>();
        int granules = (extentBlocks + granuleBlocks - 1) / granuleBlocks;
        int g = 0;
        while (g < granules)
        {
            if ((bits[g >> 6] & (1UL << (g & 63))) == 0)
            {
                g++;
                continue;
            }
            int start = g;
            while (g < granules && (bits[g >> 6] & (1UL << (g & 63))) != 0)
            {
                g++;
            }
            int first = start * granuleBlocks;
            int end = Math.Min(g * granuleBlocks, extentBlocks);
            for (int b = first; b < end; b += maxBlocks)
            {
                runs.Add((b, Math.Min(maxBlocks, end - b)));
            }
        }
        return runs;
    }
}
