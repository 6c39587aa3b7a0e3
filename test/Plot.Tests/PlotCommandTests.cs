using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using NbdServer.Tools.Plotting;
using ScottPlot;
using SkiaSharp;

namespace NbdServer.Plot.Tests;

/// <summary>nbd-plot end to end: small CSVs in, PNGs out (decoded and looked at), bad input refused with exit 2.</summary>
[TestFixture]
[CancelAfter(30_000)]
public sealed class PlotCommandTests
{
    private static readonly byte[] PngSignature = [0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A];

    private string _dir = "";

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-plot-tests.").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    /// <summary>30 seconds at 1000 IOPS and 5 ms, with a dip to 400 IOPS and 300 ms in seconds 10-15.</summary>
    private static List<TimelinePoint> Incident() =>
        Enumerable.Range(0, 30).Select(i => i is >= 10 and < 15
            ? new TimelinePoint(i - 9.5, 400, 300, 0)
            : new TimelinePoint(i - 9.5, 1000, 5, 0)).ToList();

    private string WriteCsv(string name, string text)
    {
        string path = Path.Combine(_dir, name);
        File.WriteAllText(path, text);
        return path;
    }

    private string IncidentCsv()
    {
        var sb = new StringBuilder("t_s,iops,latency_ms,errors\n");
        foreach (TimelinePoint p in Incident())
        {
            sb.Append(CultureInfo.InvariantCulture, $"{p.Seconds},{p.Iops},{p.LatencyMs},{p.Errors}\n");
        }
        return WriteCsv("timeline.csv", sb.ToString());
    }

    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = PlotCommand.Run(args, stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }

    private static (int Width, int Height) PngSize(byte[] png)
    {
        Assert.That(png.AsSpan(0, 8).ToArray(), Is.EqualTo(PngSignature), "PNG signature");
        Assert.That(Encoding.ASCII.GetString(png, 12, 4), Is.EqualTo("IHDR"), "the first chunk is the header");
        return ((int)BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan(16)), (int)BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan(20)));
    }

    /// <summary>The mean colour of the 7x7 pixels around (x, y).</summary>
    private static (double R, double G, double B) MeanColour(SKBitmap bitmap, int x, int y)
    {
        double r = 0, g = 0, b = 0;
        for (int dx = -3; dx <= 3; dx++)
        {
            for (int dy = -3; dy <= 3; dy++)
            {
                SKColor c = bitmap.GetPixel(x + dx, y + dy);
                r += c.Red; g += c.Green; b += c.Blue;
            }
        }
        return (r / 49, g / 49, b / 49);
    }

    [Test]
    public void Timeline_csv_becomes_a_png_of_the_asked_size()
    {
        string png = Path.Combine(_dir, "out.png");

        var (code, stdout, stderr) = Run("timeline", "--csv", IncidentCsv(), "--out", png, "--width", "800", "--height", "480",
            "--title", "stuck", "--fault", "0,5", "--repair", "5.5,8", "--event", "0.3:replica faulted");

        Assert.That(code, Is.EqualTo(PlotCommand.Ok), stderr);
        Assert.That(stdout, Does.Contain("wrote " + png));
        Assert.That(PngSize(File.ReadAllBytes(png)), Is.EqualTo((800, 480)));
        Assert.That(File.Exists(png + ".tmp"), Is.False, "written through a temporary file, then renamed");
    }

    [Test]
    public void Fault_window_is_shaded_red_and_repair_green_where_the_data_is_not()
    {
        var marks = new TimelineMarks([new TimeSpan2(0, 5)], [new TimeSpan2(10, 14)], [], "title", "s");
        var chart = TimelineChart.Build(Incident(), marks);
        byte[] png = PngWriter.Encode(chart, marks.Title, 900, 520);
        using SKBitmap bitmap = SKBitmap.Decode(png);
        var top = chart.GetPlot(0);

        // Below the IOPS line (at 400-1000) and off the grid lines: only the background shows there.
        var inFault = PngWriter.PixelOf(top, 2.3, 170, titled: true);
        var inRepair = PngWriter.PixelOf(top, 12.3, 170, titled: true);
        var outside = PngWriter.PixelOf(top, -5.7, 170, titled: true);
        var (fr, fg, fb) = MeanColour(bitmap, inFault.X, inFault.Y);
        var (rr, rg, rb) = MeanColour(bitmap, inRepair.X, inRepair.Y);
        var (or, og, ob) = MeanColour(bitmap, outside.X, outside.Y);

        Assert.Multiple(() =>
        {
            Assert.That(bitmap.Width, Is.EqualTo(900));
            Assert.That(bitmap.Height, Is.EqualTo(520));
            Assert.That(Math.Abs(fr - or) + Math.Abs(fg - og) + Math.Abs(fb - ob), Is.GreaterThan(30), "the fault window differs from outside it");
            Assert.That(fr, Is.GreaterThan(fg + 20), "the fault window is reddish");
            Assert.That(rg, Is.GreaterThan(rr + 10), "the repair window is greenish");
            Assert.That(Math.Min(or, Math.Min(og, ob)), Is.GreaterThan(230), "outside both it stays (near) white");
        });
    }

    [Test]
    public void Picture_has_real_content_not_a_blank_canvas()
    {
        var chart = TimelineChart.Build(Incident(), new TimelineMarks([new TimeSpan2(0, 5)], [], [], "", "s"));
        using SKBitmap bitmap = SKBitmap.Decode(PngWriter.Encode(chart, "", 600, 400));
        var colours = new HashSet<SKColor>();
        for (int y = 0; y < bitmap.Height; y += 3)
        {
            for (int x = 0; x < bitmap.Width; x += 3)
            {
                colours.Add(bitmap.GetPixel(x, y));
            }
        }
        Assert.That(colours, Has.Count.GreaterThan(20), "lines, text and shading, not one colour");
    }

    [Test]
    public void Bars_csv_becomes_a_png_with_one_panel_per_unit()
    {
        string csv = WriteCsv("bars.csv", """
            panel,group,series,value
            4k IOPS,randread-4k,ours,21000
            4k IOPS,randread-4k,qemu-nbd,30000
            4k IOPS,randwrite-4k,ours,11000
            4k IOPS,randwrite-4k,qemu-nbd,25000
            1M MiB/s,read-1M,ours,1500
            1M MiB/s,read-1M,qemu-nbd,1700
            """);
        string png = Path.Combine(_dir, "bars.png");

        var (code, _, stderr) = Run("bars", "--csv", csv, "--out", png, "--title", "bench.sh", "--width", "700", "--height", "360");

        Assert.That(code, Is.EqualTo(PlotCommand.Ok), stderr);
        Assert.That(PngSize(File.ReadAllBytes(png)), Is.EqualTo((700, 360)));
    }

    [Test]
    public void Errors_and_a_probe_with_missing_seconds_are_drawn()
    {
        string csv = WriteCsv("probe.csv", "t_s,iops,latency_ms,errors,probe_iops\n0,100,5,0,\n1,0,3000,12,900\n2,50,400,0,800\n");
        string png = Path.Combine(_dir, "probe.png");

        var (code, _, stderr) = Run("timeline", "--csv", csv, "--out", png, "--fault", "0.5,1.5");

        Assert.That(code, Is.EqualTo(PlotCommand.Ok), stderr);
        Assert.That(PngSize(File.ReadAllBytes(png)), Is.EqualTo((1000, 560)), "the default size");
    }

    [Test]
    public void Non_numeric_cell_exits_2_naming_the_file_and_line_and_writes_nothing()
    {
        string csv = WriteCsv("bad.csv", "t_s,iops,latency_ms\n0,100,5\n1,lots,5\n");
        string png = Path.Combine(_dir, "never.png");

        var (code, _, stderr) = Run("timeline", "--csv", csv, "--out", png);

        Assert.That(code, Is.EqualTo(PlotCommand.BadUsage));
        Assert.That(stderr, Does.Contain($"{csv}:3:").And.Contain("iops"));
        Assert.That(File.Exists(png), Is.False);
    }

    [Test]
    public void Missing_columns_exit_2_naming_the_expected_header()
    {
        string csv = WriteCsv("cols.csv", "second,ops\n0,100\n");

        var (code, _, stderr) = Run("timeline", "--csv", csv, "--out", Path.Combine(_dir, "x.png"));

        Assert.That(code, Is.EqualTo(PlotCommand.BadUsage));
        Assert.That(stderr, Does.Contain(CsvInput.TimelineHeader));
    }

    [Test]
    public void Time_going_backwards_exits_2()
    {
        string csv = WriteCsv("back.csv", "t_s,iops,latency_ms\n0,100,5\n2,100,5\n1,100,5\n");

        var (code, _, stderr) = Run("timeline", "--csv", csv, "--out", Path.Combine(_dir, "x.png"));

        Assert.That(code, Is.EqualTo(PlotCommand.BadUsage));
        Assert.That(stderr, Does.Contain(":4:").And.Contain("increase"));
    }

    [Test]
    public void Header_without_rows_exits_2()
    {
        var (code, _, stderr) = Run("bars", "--csv", WriteCsv("empty.csv", "panel,group,series,value\n"), "--out", Path.Combine(_dir, "x.png"));

        Assert.That(code, Is.EqualTo(PlotCommand.BadUsage));
        Assert.That(stderr, Does.Contain("no data rows"));
    }

    [Test]
    public void Missing_file_exits_2()
    {
        var (code, _, stderr) = Run("timeline", "--csv", Path.Combine(_dir, "absent.csv"), "--out", Path.Combine(_dir, "x.png"));

        Assert.That(code, Is.EqualTo(PlotCommand.BadUsage));
        Assert.That(stderr, Does.Contain("no such file"));
    }

    [TestCase("timeline", "--csv", "a.csv")]
    [TestCase("timeline", "--csv", "a.csv", "--out", "a.png", "--colour", "red")]
    [TestCase("timeline", "--csv", "a.csv", "--out", "a.png", "--fault", "5,1")]
    [TestCase("timeline", "--csv", "a.csv", "--out", "a.png", "--width", "10")]
    [TestCase("histogram", "--csv", "a.csv")]
    [TestCase]
    public void Bad_usage_exits_2_with_a_message(params string[] args)
    {
        var (code, _, stderr) = Run(args);

        Assert.That(code, Is.EqualTo(PlotCommand.BadUsage));
        Assert.That(stderr, Is.Not.Empty);
    }

    [Test]
    public void Help_exits_0_and_names_both_commands()
    {
        var (code, stdout, _) = Run("--help");

        Assert.That(code, Is.EqualTo(PlotCommand.Ok));
        Assert.That(stdout, Does.Contain("timeline").And.Contain("bars"));
    }
}
