using System.Buffers.Binary;
using System.Security.Cryptography;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// What a changed-block catch-up needs from a region: in-place commits, and extents the downstairs
/// cannot vouch for (uncertain) reported until a flush or a commit replaces them. Boot ids are
/// injected, so "the machine rebooted" is a different Guid, not a reboot.
/// </summary>
[CancelAfter(30_000)]
public sealed class CatchUpRegionTests
{
    private static readonly Guid BootA = new("0a0a0a0a-0000-4000-8000-00000000000a");
    private static readonly Guid BootB = new("0b0b0b0b-0000-4000-8000-00000000000b");

    private TempDir _dir = null!;

    private string RegionDir => _dir.Sub("r");

    [SetUp]
    public void SetUp() => _dir = new TempDir();

    [TearDown]
    public void TearDown() => _dir.Dispose();

    /// <summary>4 extents of 256 blocks, created in boot A.</summary>
    private Region CreateSmall() => Region.Create(RegionDir, 4 << 20, 4096, 256, preallocate: false, bootId: () => BootA);

    private Region OpenIn(Guid? boot, bool readOnly = false) => Region.Open(RegionDir, readOnly, () => boot);

    private static void WriteBlock(Region r, long block, int version)
    {
        byte[] data = TestData.Block(4096, block, version);
        byte[] hash = new byte[8];
        BlockContext.HashBlocks(data, 4096, hash);
        r.Write(new BlockRange(block, 1), hash, data, (ulong)version);
    }

    /// <summary>Creates the region in boot A with extent 1 written and never flushed (dirty on disk).</summary>
    private void CreateWithDirtyExtent1()
    {
        using Region r = CreateSmall();
        WriteBlock(r, 300, 1);
    }

    [Test]
    public void In_place_commit_makes_written_blocks_and_the_record_durable()
    {
        using (Region r = CreateSmall())
        {
            WriteBlock(r, 300, 7);
            WriteBlock(r, 301, 7);
            Assert.That(r.GetExtentMeta(1).Dirty, Is.True, "the catch-up's writes made the extent dirty first");
            r.MarkRepairPending([1]);
            r.CommitInPlace(1, new ExtentMeta(4, 17, false));
            Assert.That(r.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(4, 17, false)));
            Assert.That(r.IsRepairPending(1), Is.False);
        }
        // Reopened after a reboot: a clean record is not uncertain, and the blocks are there.
        using Region again = OpenIn(BootB);
        Assert.That(again.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(4, 17, false)));
        byte[] back = new byte[2 * 4096];
        byte[] hashes = new byte[16];
        again.Read(new BlockRange(300, 2), hashes, back);
        Assert.That(back, Is.EqualTo((byte[])[.. TestData.Block(4096, 300, 7), .. TestData.Block(4096, 301, 7)]));
        Assert.That(BlockContext.Verify(back.AsSpan(0, 4096), BinaryPrimitives.ReadUInt64LittleEndian(hashes)), Is.True);
    }

    [Test]
    public void In_place_commit_may_record_the_source_dirty()
    {
        using (Region r = CreateSmall())
        {
            WriteBlock(r, 300, 1);
            r.CommitInPlace(1, new ExtentMeta(2, 5, true));
        }
        using Region again = OpenIn(BootA);
        Assert.That(again.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(2, 5, true)));
    }

    [Test]
    public void Extent_dirty_at_open_in_another_boot_is_uncertain_and_stays_so_across_a_same_boot_reopen()
    {
        using (Region r = CreateSmall())
        {
            WriteBlock(r, 600, 1);
            r.Flush(3, 1);
            WriteBlock(r, 300, 2);
        }
        using (Region rebooted = OpenIn(BootB))
        {
            Assert.That(rebooted.BootAtOpen, Is.EqualTo(BootAtOpen.Rebooted));
            Assert.That(rebooted.UncertainAtOpen, Is.EqualTo(1));
            Assert.That(rebooted.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(0, 0, true, Uncertain: true)));
            Assert.That(rebooted.GetExtentMeta(2), Is.EqualTo(new ExtentMeta(1, 3, false)), "a flushed extent is not uncertain");
        }
        // The downstairs restarts in the same boot: the mark was recorded, not re-derived.
        using Region restarted = OpenIn(BootB);
        Assert.That(restarted.BootAtOpen, Is.EqualTo(BootAtOpen.Same));
        Assert.That(restarted.GetExtentMeta(1).Uncertain, Is.True);
        Assert.That(restarted.GetAllExtentMeta().Count(m => m.Uncertain), Is.EqualTo(1));
    }

    [Test]
    public void Extent_dirty_at_a_same_boot_reopen_is_not_uncertain()
    {
        CreateWithDirtyExtent1();
        using Region restarted = OpenIn(BootA);
        Assert.That(restarted.BootAtOpen, Is.EqualTo(BootAtOpen.Same));
        Assert.That(restarted.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(0, 0, true)), "a process restart loses no write the kernel accepted");
    }

    [Test]
    public void Writes_to_an_uncertain_extent_keep_it_uncertain()
    {
        CreateWithDirtyExtent1();
        using (Region r = OpenIn(BootB))
        {
            WriteBlock(r, 310, 2);
        }
        using Region again = OpenIn(BootB);
        Assert.That(again.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(0, 0, true, Uncertain: true)));
    }

    [Test]
    public void Flush_stamps_an_uncertain_extent_and_clears_the_mark_durably()
    {
        CreateWithDirtyExtent1();
        using (Region r = OpenIn(BootB))
        {
            r.Flush(9, 2);
            Assert.That(r.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(2, 9, false)));
        }
        using Region again = OpenIn(BootB);
        Assert.That(again.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(2, 9, false)));
    }

    [Test]
    public void Flush_leaves_an_uncertain_extent_pending_repair_unstamped_and_uncertain()
    {
        CreateWithDirtyExtent1();
        using (Region r = OpenIn(BootB))
        {
            r.MarkRepairPending([1]);
            r.Flush(9, 2);
            Assert.That(r.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(0, 0, true, Uncertain: true)));
        }
        using Region again = OpenIn(BootB);
        Assert.That(again.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(0, 0, true, Uncertain: true)));
    }

    [TestCase(false, TestName = "Staged commit clears the uncertain mark durably")]
    [TestCase(true, TestName = "In-place commit clears the uncertain mark durably")]
    public void Commit_clears_the_uncertain_mark_durably(bool inPlace)
    {
        CreateWithDirtyExtent1();
        using (Region r = OpenIn(BootB))
        {
            r.MarkRepairPending([1]);
            if (inPlace)
            {
                WriteBlock(r, 300, 3);
                r.CommitInPlace(1, new ExtentMeta(2, 9, false));
            }
            else
            {
                r.WriteStaging(new ExtentRange(1, 0, 256, ExtentRange.BeginFlag), new byte[256 * BlockContext.Size], new byte[256 * 4096]);
                r.CommitStaging(1, new ExtentMeta(2, 9, false));
            }
            Assert.That(r.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(2, 9, false)));
        }
        using Region again = OpenIn(BootB);
        Assert.That(again.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(2, 9, false)));
    }

    [Test]
    public void Region_written_before_boot_ids_were_recorded_opens_and_its_dirty_extents_are_uncertain()
    {
        CreateWithDirtyExtent1();
        // What the previous code left: zeroes where the boot slots now are, bit 1 never set.
        byte[] meta = File.ReadAllBytes(RegionLayout.MetaPath(RegionDir));
        Assert.That(RegionLayout.ReadBootSlot(meta.AsSpan(RegionLayout.BootSlotOffsetA, RegionLayout.BootSlotSize)), Is.Not.Null, "this code records the boot");
        meta.AsSpan(RegionLayout.BootSlotOffsetA, RegionLayout.BootSlotOffsetB + RegionLayout.BootSlotSize - RegionLayout.BootSlotOffsetA).Clear();
        File.WriteAllBytes(RegionLayout.MetaPath(RegionDir), meta);

        using (Region old = OpenIn(BootA))
        {
            Assert.That(old.BootAtOpen, Is.EqualTo(BootAtOpen.NotRecorded));
            Assert.That(old.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(0, 0, true, Uncertain: true)), "boot unknown: a dirty extent may have lost writes");
            Assert.That(old.GetExtentMeta(0), Is.EqualTo(new ExtentMeta(0, 0, false)));
        }
        using Region again = OpenIn(BootA);
        Assert.That(again.BootAtOpen, Is.EqualTo(BootAtOpen.Same), "the first open recorded the boot");
        Assert.That(again.GetExtentMeta(1).Uncertain, Is.True);
    }

    [Test]
    public void Unreadable_boot_id_makes_dirty_extents_uncertain_at_every_open()
    {
        CreateWithDirtyExtent1();
        using (Region r = OpenIn(null))
        {
            Assert.That(r.BootAtOpen, Is.EqualTo(BootAtOpen.Unreadable));
            Assert.That(r.GetExtentMeta(1).Uncertain, Is.True);
        }
        using Region again = OpenIn(BootA);
        Assert.That(again.BootAtOpen, Is.EqualTo(BootAtOpen.Same), "an unknown boot is never recorded over a known one");
        Assert.That(again.GetExtentMeta(1).Uncertain, Is.True);
    }

    [Test]
    public void Read_only_open_in_another_boot_reports_uncertain_and_changes_nothing_on_disk()
    {
        CreateWithDirtyExtent1();
        string before = Hash(RegionLayout.MetaPath(RegionDir));
        using (Region reader = OpenIn(BootB, readOnly: true))
        {
            Assert.That(reader.GetExtentMeta(1).Uncertain, Is.True);
        }
        Assert.That(Hash(RegionLayout.MetaPath(RegionDir)), Is.EqualTo(before));
        using Region writer = OpenIn(BootA);
        Assert.That(writer.GetExtentMeta(1).Uncertain, Is.False, "the serving process's boot is still the recorded one");
    }

    private static string Hash(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));
}
