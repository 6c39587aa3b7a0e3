namespace NbdServer.Downstairs.Storage;

/// <summary>
/// Which boot of the machine this is: Linux makes up a random id at every boot. A region records
/// the id it was last opened in, so the next open can tell a process restart (the page cache, and
/// every write the kernel accepted, survived) from a reboot (unsynced writes may be gone).
/// </summary>
internal static class BootId
{
    public const string ProcPath = "/proc/sys/kernel/random/boot_id";

    /// <summary>The current boot id, or null when it cannot be read (not Linux, /proc not mounted).</summary>
    public static Guid? Current()
    {
        try
        {
            return Guid.TryParse(File.ReadAllText(ProcPath).Trim(), out Guid id) && id != Guid.Empty ? id : null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }
}

/// <summary>How a region's open compared the machine's boot with the one it was last opened in.</summary>
internal enum BootAtOpen
{
    /// <summary>Same boot: a process restart; every write the kernel accepted is still there (or on disk).</summary>
    Same,
    /// <summary>The machine rebooted since: writes not yet fdatasynced may be gone.</summary>
    Rebooted,
    /// <summary>The region records no boot (written before boot ids were recorded): treated as a reboot.</summary>
    NotRecorded,
    /// <summary>This machine's boot id cannot be read: treated as a reboot, at every open.</summary>
    Unreadable,
}
