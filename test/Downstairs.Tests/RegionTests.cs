using System.Buffers.Binary;
using System.Security.Cryptography;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

[CancelAfter(30_000)]
public sealed class RegionTests
{
    private TempDir _dir = null!;

    private string RegionDir => _dir.Sub("r");

    [SetUp]
    public void SetUp() => _dir = new TempDir();

    [TearDown]
    public void TearDown() => _dir.Dispose();

    private Region CreateSmall() => Region.Create(RegionDir, 4 << 20, 4096, 256, preallocate: false);

    private static byte[] Hashes(byte[] data, int bs)
    {
        byte[] h = new byte[data.Length / bs * 8];
        BlockContext.HashBlocks(data, bs, h);
        return h;
    }

    /// <summary>Every file's name and content hash: proves "nothing changed on disk".</summary>
    private Dictionary<string, string> Snapshot() =>
        Directory.EnumerateFiles(RegionDir, "*", SearchOption.AllDirectories)
            .ToDictionary(f => f, f => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(f))) + "/" + File.GetLastWriteTimeUtc(f).Ticks);

    [Test]
    public void Create_then_open_gives_the_same_region()
    {
        Guid uuid;
        using (Region r = CreateSmall())
        {
            uuid = r.Uuid;
        }
        using Region again = Region.Open(RegionDir);
        Assert.That((again.Uuid, again.Geometry), Is.EqualTo((uuid, new RegionGeometry(4096, 256, 4))));
    }

    [Test]
    public void Create_refuses_to_overwrite_a_region()
    {
        CreateSmall().Dispose();
        Assert.That(() => CreateSmall(), Throws.InstanceOf<IOException>().With.Message.Contains("already exists"));
    }

    [Test]
    public void Size_that_is_not_whole_extents_is_refused_with_a_hint()
    {
        Assert.That(() => Region.Create(RegionDir, (4 << 20) + 4096, 4096, 256, false), Throws.ArgumentException.With.Message.Contains("whole number of extents"));
    }

    [Test]
    public void Flush_records_generation_and_flush_number_and_clears_dirty_durably()
    {
        using (Region r = CreateSmall())
        {
            byte[] data = TestData.Block(4096, 300, 1);
            r.Write(new BlockRange(300, 1), Hashes(data, 4096), data, 1);
            Assert.That(r.GetExtentMeta(1).Dirty, Is.True);
            r.Flush(17, 4);
            r.Write(new BlockRange(600, 1), Hashes(data, 4096), data, 2);
        }
        using Region again = Region.Open(RegionDir, readOnly: true);
        Assert.That(again.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(4, 17, false)));
        Assert.That(again.GetExtentMeta(2), Is.EqualTo(new ExtentMeta(0, 0, true)), "a write without flush leaves its extent dirty on disk");
        Assert.That(again.GetExtentMeta(0), Is.EqualTo(new ExtentMeta(0, 0, false)));
    }

    [Test]
    public void Generation_fence_survives_reopen()
    {
        using (Region r = CreateSmall())
        {
            r.RecordGeneration(9);
        }
        using Region again = Region.Open(RegionDir);
        Assert.That(again.HighestGeneration, Is.EqualTo(9UL));
    }

    [Test]
    public void Torn_block_is_caught_by_its_hash()
    {
        using (Region r = CreateSmall())
        {
            byte[] data = TestData.Block(4096, 5, 1);
            r.Write(new BlockRange(5, 1), Hashes(data, 4096), data, 1);
            r.Flush(1, 1);
        }
        // Half the block new, half old: what a crash inside a pwrite can leave.
        using (FileStream f = File.OpenWrite(RegionLayout.ExtentPath(RegionDir, 0)))
        {
            f.Position = (5 * 4096) + 2048;
            f.Write(new byte[2048]);
        }
        using Region again = Region.Open(RegionDir);
        byte[] back = new byte[4096];
        byte[] hash = new byte[8];
        again.Read(new BlockRange(5, 1), hash, back);
        Assert.That(BlockContext.Verify(back, BinaryPrimitives.ReadUInt64LittleEndian(hash)), Is.False);
    }

    [Test]
    public void Torn_metadata_record_falls_back_to_the_previous_slot()
    {
        using (Region r = CreateSmall())
        {
            byte[] data = TestData.Block(4096, 0, 1);
            r.Write(new BlockRange(0, 1), Hashes(data, 4096), data, 1);
            r.Flush(1, 1);
        }
        // The flush wrote extent 0's slots: dirty (seq 2, slot 1) then clean (seq 3, slot 0). Tear the newest.
        using (FileStream f = File.OpenWrite(RegionLayout.MetaPath(RegionDir)))
        {
            f.Position = RegionLayout.RecordOffset(0, 0) + 8;
            f.Write([0xFF, 0xFF]);
        }
        using Region again = Region.Open(RegionDir);
        Assert.That(again.GetExtentMeta(0), Is.EqualTo(new ExtentMeta(0, 0, true)), "the older, dirty record wins: safe, the engine repairs a dirty extent");
    }

    private static IEnumerable<TestCaseData> Damage()
    {
        yield return new TestCaseData((Action<string>)(d => Truncate(RegionLayout.ExtentPath(d, 2), 1000)), "e000002.dat", "truncated").SetName("Truncated_extent_file_is_named");
        yield return new TestCaseData((Action<string>)(d => File.Delete(RegionLayout.ExtentPath(d, 1))), "e000001.dat", "missing").SetName("Missing_extent_file_is_named");
        yield return new TestCaseData((Action<string>)(d => Truncate(RegionLayout.MetaPath(d), 4200)), "region.meta", "truncated").SetName("Truncated_metadata_is_named");
        yield return new TestCaseData((Action<string>)(d => Poke(RegionLayout.MetaPath(d), 0, 0x58)), "region.meta", "bad magic").SetName("Bad_magic_is_named");
        yield return new TestCaseData((Action<string>)(d => Poke(RegionLayout.MetaPath(d), 8, 7)), "region.meta", "format version 7").SetName("Wrong_version_is_named");
        yield return new TestCaseData((Action<string>)(d => Poke(RegionLayout.MetaPath(d), 33, 0x99)), "region.meta", "checksum").SetName("Corrupt_header_is_named");
        yield return new TestCaseData((Action<string>)(d =>
        {
            Poke(RegionLayout.MetaPath(d), (int)RegionLayout.RecordOffset(3, 0) + 3, 0x99);
        }), "region.meta", "extent 3 has no valid metadata record").SetName("Corrupt_extent_record_is_named");
    }

    [TestCaseSource(nameof(Damage))]
    public void Damaged_region_is_refused_naming_the_file_and_left_unchanged(Action<string> damage, string file, string problem)
    {
        CreateSmall().Dispose();
        File.WriteAllBytes(RegionLayout.ExtentPath(RegionDir, 0) + RegionLayout.StagingSuffix, [1, 2, 3]);
        damage(RegionDir);
        Dictionary<string, string> before = Snapshot();
        Assert.That(() => Region.Open(RegionDir), Throws.TypeOf<RegionDamagedException>().With.Message.Contains(file).And.Message.Contains(problem));
        Assert.That(Snapshot(), Is.EqualTo(before));
    }

    [Test]
    public void Stale_repair_staging_is_removed_when_a_healthy_region_opens()
    {
        CreateSmall().Dispose();
        string staging = RegionLayout.ExtentPath(RegionDir, 0) + RegionLayout.StagingSuffix;
        File.WriteAllBytes(staging, [1, 2, 3]);
        using Region r = Region.Open(RegionDir);
        Assert.That(File.Exists(staging), Is.False);
    }

    [Test]
    public void A_second_writer_on_the_same_region_is_refused()
    {
        using Region first = CreateSmall();
        Assert.That(() => Region.Open(RegionDir), Throws.InstanceOf<IOException>().With.Message.Contains("in use"));
        using Region reader = Region.Open(RegionDir, readOnly: true);
        Assert.That(reader.Uuid, Is.EqualTo(first.Uuid), "info (read-only) still works while served");
    }

    private static void Truncate(string path, long length)
    {
        using FileStream f = File.OpenWrite(path);
        f.SetLength(length);
    }

    private static void Poke(string path, int offset, byte value)
    {
        using FileStream f = File.OpenWrite(path);
        f.Position = offset;
        f.WriteByte(value);
    }
}
