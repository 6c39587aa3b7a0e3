namespace NbdServer.SystemTests;

/// <summary>The checkout the tests run from (scripts, docs and sources live there, not in the output directory).</summary>
internal static class Repository
{
    /// <summary>The nearest directory above the test binaries that holds nbd-server.sln.</summary>
    public static string Root { get; } = FindRoot();

    private static string FindRoot()
    {
        for (string? dir = AppContext.BaseDirectory; dir is not null; dir = Path.GetDirectoryName(dir))
        {
            if (File.Exists(Path.Combine(dir, "nbd-server.sln")))
            {
                return dir;
            }
        }
        throw new InvalidOperationException($"nbd-server.sln not found above {AppContext.BaseDirectory}");
    }
}
