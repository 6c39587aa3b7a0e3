using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Cli;

/// <summary>
/// <c>nbd-downstairs compare DIR DIR [DIR...]</c>: do these regions (replicas of one volume) hold the
/// same blocks and the same per-extent metadata? Opens every region read-only, without the lock,
/// so it changes nothing on disk and also works while the regions are being served (then it sees
/// a moment's snapshot per chunk, not one consistent instant).
/// </summary>
internal static class CompareCommand
{
    public const int Identical = 0;
    public const int Different = 1;
    public const int Unusable = 2;

    /// <summary><c>nbd-downstairs compare ARGS</c> (tests): parsed and run as the executable does.</summary>
    public static int Run(IReadOnlyList<string> args, TextWriter output, TextWriter error) =>
        DownstairsCommandLine.Program.Run(["compare", .. args], output, error);

    public static int Run(IReadOnlyList<string> dirs, int maxList, bool quiet, TextWriter output, TextWriter error)
    {
        var regions = new List<Region>();
        try
        {
            foreach (string dir in dirs)
            {
                regions.Add(Region.Open(dir, readOnly: true));
            }
            RegionComparison result = RegionComparison.Compare(regions);
            if (!quiet)
            {
                for (int i = 0; i < regions.Count; i++)
                {
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"region {i}: {Path.GetFullPath(dirs[i])} uuid {regions[i].Uuid} highest generation {regions[i].HighestGeneration}"));
                }
                foreach (string line in result.Lines.Take(maxList))
                {
                    output.WriteLine(line);
                }
                if (result.Lines.Count > maxList)
                {
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"... {result.Lines.Count - maxList} more differences not listed (--max-list)"));
                }
            }
            output.WriteLine(result.Summary);
            return result.IsIdentical ? Identical : Different;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            error.WriteLine($"nbd-downstairs compare: {e.Message}");
            return Unusable;
        }
        finally
        {
            foreach (Region r in regions)
            {
                r.Dispose();
            }
        }
    }
}

/// <summary>The outcome of comparing regions: one line per differing extent (or geometry), and a verdict.</summary>
internal sealed class RegionComparison
{
    /// <summary>Blocks read per region per step (bounded memory: chunk × (block + 16) × regions).</summary>
    private const int ChunkBytes = 4 << 20;

    private RegionComparison(List<string> lines, List<int> extents, string summary)
    {
        Lines = lines;
        DifferingExtents = extents;
        Summary = summary;
    }

    public IReadOnlyList<string> Lines { get; }

    /// <summary>Extents whose metadata or blocks differ (empty when the geometry differs: nothing was compared).</summary>
    public IReadOnlyList<int> DifferingExtents { get; }

    public bool IsIdentical => Lines.Count == 0;

    public string Summary { get; }

    public static RegionComparison Compare(IReadOnlyList<Region> regions)
    {
        CultureInfo c = CultureInfo.InvariantCulture;
        var lines = new List<string>();
        var differing = new List<int>();
        RegionGeometry g = regions[0].Geometry;
        if (regions.Any(r => r.Geometry != g))
        {
            lines.Add("geometry differs: " + string.Join(" | ", regions.Select(r =>
                string.Create(c, $"{r.Geometry.BlockSize} B blocks × {r.Geometry.ExtentBlocks} per extent × {r.Geometry.ExtentCount} extents"))));
            return new RegionComparison(lines, differing, "DIFFERENT: geometry differs; blocks not compared");
        }

        int bs = g.BlockSize;
        int chunkBlocks = Math.Max(1, Math.Min(g.ExtentBlocks, ChunkBytes / bs));
        byte[][] data = [.. regions.Select(_ => new byte[chunkBlocks * bs])];
        byte[][] contexts = [.. regions.Select(_ => new byte[chunkBlocks * BlockContext.Size])];
        long blocksCompared = 0;
        for (int e = 0; e < g.ExtentCount; e++)
        {
            var problems = new List<string>();
            // Uncertain is each downstairs' own judgement of its disk, not part of what replicas share.
            ExtentMeta[] metas = [.. regions.Select(r => r.GetExtentMeta(e) with { Uncertain = false })];
            if (metas.Any(m => m != metas[0]))
            {
                problems.Add("metadata (generation/flush/dirty) " + string.Join(" | ", metas.Select(m => string.Create(c, $"{m.Generation}/{m.FlushNumber}/{(m.Dirty ? "dirty" : "clean")}"))));
            }
            int dataDiffers = 0;
            long firstDataDiff = -1;
            int[] badHash = new int[regions.Count];
            long[] firstBadHash = [.. regions.Select(_ => -1L)];
            for (int first = 0; first < g.ExtentBlocks; first += chunkBlocks)
            {
                int count = Math.Min(chunkBlocks, g.ExtentBlocks - first);
                for (int r = 0; r < regions.Count; r++)
                {
                    regions[r].ReadExtent(new ExtentRange(e, first, count), contexts[r], data[r]);
                }
                for (int b = 0; b < count; b++)
                {
                    long block = ((long)e * g.ExtentBlocks) + first + b;
                    ReadOnlySpan<byte> reference = data[0].AsSpan(b * bs, bs);
                    bool same = true;
                    for (int r = 0; r < regions.Count; r++)
                    {
                        ReadOnlySpan<byte> mine = data[r].AsSpan(b * bs, bs);
                        if (r > 0 && !mine.SequenceEqual(reference))
                        {
                            same = false;
                        }
                        ulong stored = BinaryPrimitives.ReadUInt64LittleEndian(contexts[r].AsSpan(b * BlockContext.Size));
                        if (!BlockContext.Verify(mine, stored))
                        {
                            if (badHash[r]++ == 0)
                            {
                                firstBadHash[r] = block;
                            }
                        }
                    }
                    if (!same && dataDiffers++ == 0)
                    {
                        firstDataDiff = block;
                    }
                }
                blocksCompared += count;
            }
            if (dataDiffers > 0)
            {
                problems.Add(string.Create(c, $"{dataDiffers} block(s) hold different data (first: block {firstDataDiff})"));
            }
            for (int r = 0; r < regions.Count; r++)
            {
                if (badHash[r] > 0)
                {
                    problems.Add(string.Create(c, $"region {r}: {badHash[r]} block(s) do not match their stored hash (first: block {firstBadHash[r]})"));
                }
            }
            if (problems.Count > 0)
            {
                differing.Add(e);
                lines.Add(string.Create(c, $"extent {e} (blocks {(long)e * g.ExtentBlocks}..{((long)(e + 1) * g.ExtentBlocks) - 1}): {string.Join("; ", problems)}"));
            }
        }
        string summary = differing.Count == 0
            ? string.Create(c, $"IDENTICAL: {regions.Count} regions, {g.ExtentCount} extents, {blocksCompared} blocks of {bs} B each")
            : string.Create(c, $"DIFFERENT: {differing.Count} of {g.ExtentCount} extents differ across {regions.Count} regions");
        return new RegionComparison(lines, differing, summary);
    }
}
