using NbdServer.Common.Volumes;
using NbdServer.Frontend.Qos;

namespace NbdServer.Frontend.Server;

/// <summary>An export: a named volume as clients see it.</summary>
internal sealed record NbdExport(string Name, IBlockVolume Volume, string Description = "", bool ReadOnly = false)
{
    public bool IsReadOnly => ReadOnly || (Volume.Features & VolumeFeatures.ReadOnly) != 0;

    /// <summary>The export's QoS limits, shared by all its connections (none by default).</summary>
    public QosLimiter Qos { get; init; } = new();
}

/// <summary>
/// The exports this server offers. The first one is the default: it is also served under the
/// empty name, so <c>nbd-client HOST PORT /dev/nbd0</c> and <c>nbdinfo nbd://HOST</c> just work.
/// </summary>
internal sealed class ExportRegistry
{
    private readonly Dictionary<string, NbdExport> _byName = new(StringComparer.Ordinal);
    private readonly List<NbdExport> _ordered = [];

    public ExportRegistry(IEnumerable<NbdExport> exports)
    {
        foreach (NbdExport export in exports)
        {
            if (export.Name.Length == 0 || !_byName.TryAdd(export.Name, export))
            {
                throw new ArgumentException($"Export names must be non-empty and unique; '{export.Name}' is not.");
            }
            _ordered.Add(export);
            QosMetrics.Track(export.Name, export.Qos);
        }
        if (_ordered.Count == 0)
        {
            throw new ArgumentException("At least one export is required.");
        }
    }

    public IReadOnlyList<NbdExport> All => _ordered;

    public NbdExport Default => _ordered[0];

    public bool TryGet(string name, out NbdExport export)
    {
        if (name.Length == 0)
        {
            export = Default;
            return true;
        }
        return _byName.TryGetValue(name, out export!);
    }
}
